"""A model's caches carry over between generations (same output, fewer prefilled tokens), and a model is never shared
by two generations at once."""
from __future__ import annotations

import threading

import pytest

from dovetail_onnx.runtime import DovetailError, Generator, GeneratorParams, Model, SamplingParams, generate

MODES = ["speculative", "target-only"]


@pytest.fixture(scope="module")
def model(artifacts) -> Model:
    """A model of this module's own: these tests leave its caches in every state."""
    return Model(artifacts["llama"], draft_device="cpu", threads=1)


def cold(model: Model, prompt: list[int], params: GeneratorParams) -> list[int]:
    """Output after the caches were filled by an unrelated prompt (first token differs: nothing is reused)."""
    generate(model, [7, 7, 7], GeneratorParams(max_new_tokens=4))
    tokens, stats = generate(model, prompt, params)
    assert stats.cached_tokens == 0
    return tokens


@pytest.mark.parametrize("mode", MODES)
def test_conversation_turns_reuse_the_caches_and_match_cold_output(model, mode):
    params = GeneratorParams(max_new_tokens=24, mode=mode, stop_at_eos=False)
    messages = [{"role": "user", "content": "hello there"}]
    previous: list[int] = []
    for turn in range(3):
        prompt = model.tokenizer.chat(messages)
        expected = cold(model, prompt, params)
        if previous:
            generate(model, previous, params)  # the caches now hold the last turn, as in a conversation
        tokens, stats = generate(model, prompt, params)
        assert tokens == expected, (mode, turn)
        assert stats.cached_tokens >= len(previous) - 1
        previous = prompt
        messages += [{"role": "assistant", "content": model.tokenizer.decode(tokens)},
                     {"role": "user", "content": f"and turn {turn + 2}?"}]


@pytest.mark.parametrize("mode", MODES)
def test_reuse_keeps_all_but_the_last_prompt_token(model, mode):
    """The same prompt twice reuses all but one token; a prompt that extends the last output reuses up to it."""
    params = GeneratorParams(max_new_tokens=30, mode=mode, stop_at_eos=False)
    prompt = model.encode_prompt("reuse me", raw=True)
    first, stats = generate(model, prompt, params)
    assert stats.cached_tokens == 0 or mode == "target-only"
    again, stats = generate(model, prompt, params)
    assert again == first and stats.cached_tokens == len(prompt) - 1
    longer = prompt + first[:20]
    tokens, stats = generate(model, longer, params)
    assert stats.cached_tokens >= len(prompt) and tokens == cold(model, longer, params)


def test_reuse_grows_the_caches_when_a_turn_needs_more_room(model):
    short = GeneratorParams(max_new_tokens=8, stop_at_eos=False)
    prompt = model.encode_prompt("grow", raw=True)
    tokens, _ = generate(model, prompt, short)
    capacity = model.target.kv.capacity
    longer = prompt + tokens + model.encode_prompt(" the cache now", raw=True)
    params = GeneratorParams(max_new_tokens=200, stop_at_eos=False)
    out, stats = generate(model, longer, params)
    assert model.target.kv.capacity > capacity and stats.cached_tokens >= len(prompt)
    assert out == cold(model, longer, params)


@pytest.mark.parametrize("mode", MODES)
def test_a_seed_repeats_whatever_the_caches_hold(model, mode):
    """Target-only sampling reuses the caches; speculative sampling starts cold (its draws follow the drafter's
    trees, which kept rows of the quantized drafter could change)."""
    params = GeneratorParams(max_new_tokens=24, mode=mode, stop_at_eos=False,
                             sampling=SamplingParams(0.8, 0.9, 0, seed=3))
    prompt = model.encode_prompt("sample me", raw=True)
    generate(model, prompt[:-1], params)
    tokens, stats = generate(model, prompt, params)
    assert stats.cached_tokens == (len(prompt) - 2 if mode == "target-only" else 0)
    assert tokens == cold(model, prompt, params)


def test_a_second_generator_on_a_busy_model_is_refused(model):
    params = GeneratorParams(max_new_tokens=16, stop_at_eos=False)
    a, b = model.encode_prompt("first", raw=True), model.encode_prompt("second", raw=True)
    expected_a, expected_b = cold(model, a, params), cold(model, b, params)
    first = Generator(model, params, a)
    first.generate_next_token()
    with pytest.raises(DovetailError, match="model is busy with another generation"):
        Generator(model, params, b)
    for _ in first:
        pass
    assert first.tokens == expected_a
    second = Generator(model, params, b)  # the first is done: the model is free again
    second.generate_next_token()
    second.close()
    third = Generator(model, params, b)
    assert [t for step in third for t in step] == expected_b


def test_an_abandoned_generator_frees_the_model(model):
    params = GeneratorParams(max_new_tokens=16, stop_at_eos=False)
    prompt = model.encode_prompt("abandon", raw=True)
    expected = cold(model, prompt, params)
    generator = Generator(model, params, prompt)
    generator.generate_next_token()
    del generator
    assert generate(model, prompt, params)[0] == expected


def test_two_threads_on_one_model_never_corrupt_each_other(model):
    """Each thread either gets exactly its own output or the busy error; never another's tokens or a mix."""
    params = GeneratorParams(max_new_tokens=40, stop_at_eos=False)
    prompts = [model.encode_prompt(text, raw=True) for text in ("thread one", "thread two")]
    expected = [cold(model, p, params) for p in prompts]
    results: list[list] = [[], []]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        for _ in range(20):
            try:
                results[i].append(generate(model, prompts[i], params)[0])
            except DovetailError as exc:
                results[i].append(str(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(2):
        assert len(results[i]) == 20
        for result in results[i]:
            assert result == expected[i] or "model is busy" in result
    assert any(result == expected[i] for i in range(2) for result in results[i])
