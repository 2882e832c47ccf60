"""A model's caches carry over between generations: same output, fewer prefilled tokens."""
from __future__ import annotations

import pytest

from dovetail_onnx.runtime import GeneratorParams, Model, SamplingParams, generate

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


def test_sampled_target_only_reuse_matches_cold_with_the_same_seed(model):
    """Speculative sampling is exact in distribution only: its draws follow the drafter's trees, and the int8
    drafter's activation scale spans the rows of one call, so kept rows may propose other trees than a cold run's."""
    params = GeneratorParams(max_new_tokens=24, mode="target-only", stop_at_eos=False,
                             sampling=SamplingParams(0.8, 0.9, 0, seed=3))
    prompt = model.encode_prompt("sample me", raw=True)
    generate(model, prompt[:-1], params)
    tokens, stats = generate(model, prompt, params)
    assert stats.cached_tokens == len(prompt) - 2
    assert tokens == cold(model, prompt, params)
