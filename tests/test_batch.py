"""Continuous batching: generations stepped together, one target forward a step, give what each gives alone."""
from __future__ import annotations

import pytest

from dovetail_onnx.runtime import GeneratorParams, Model, SamplingParams, generate, kernels
from dovetail_onnx.runtime.batch import BatchEngine, batchable
from dovetail_onnx.runtime.errors import DovetailError

pytestmark = pytest.mark.skipif(not kernels.rows_library()[0], reason="batching needs dovetail's kernels")

PROMPTS = ["hello world", "1, 2, 3, 4, 1, 2, 3, 4,", "Speculative decoding is", "a b c", "tree"]


def run(engine: BatchEngine, arrivals: dict[int, list], steps_cap: int = 2000) -> dict:
    """Step the engine; `arrivals[step]` lists (key, prompt, params) joining before that step. Returns tokens by key."""
    out, keys, step = {}, {}, 0
    while step < steps_cap and (engine.active or any(s >= step for s in arrivals)):
        for key, prompt, params in arrivals.get(step, []):
            keys[engine.add(prompt, params)] = key
        engine.step()
        for seq in list(engine.active):
            if seq.done:
                engine.remove(seq)
                out[keys[seq]] = (seq.tokens, seq.stats)
        step += 1
    return out


def requests(model: Model) -> list[tuple]:
    modes = [GeneratorParams(40, stop_at_eos=False), GeneratorParams(24, mode="target-only", stop_at_eos=False),
             GeneratorParams(33, stop_at_eos=False, lookup=False)]
    return [(i, model.encode_prompt(text, raw=True), modes[i % len(modes)]) for i, text in enumerate(PROMPTS)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batched_greedy_generations_equal_each_alone(kind, artifacts, tmp_path):
    model = Model(artifacts[kind], draft_device="cpu", threads=1)
    wanted = requests(model)
    alone = {key: generate(model, prompt, params)[0] for key, prompt, params in wanted}
    engine = BatchEngine(model, capacity=64)  # small: the buffer is compacted and grown on the way
    try:
        # Two at the start, the rest arriving while others decode or prefill.
        out = run(engine, {0: wanted[:2], 3: wanted[2:4], 9: wanted[4:]})
    finally:
        engine.close()
    assert {key: tokens for key, (tokens, _) in out.items()} == alone


def test_quantized_batched_generations_equal_each_alone(quantized):
    model = quantized["int4"]
    wanted = requests(model)
    alone = {key: generate(model, prompt, params)[0] for key, prompt, params in wanted}
    engine = BatchEngine(model)
    try:
        out = run(engine, {0: wanted[:3], 2: wanted[3:]})
    finally:
        engine.close()
    assert {key: tokens for key, (tokens, _) in out.items()} == alone


def test_a_generation_alone_in_the_batch_speculates_and_samples_as_generate_does(models):
    model = models["llama"]
    prompt = model.encode_prompt("1, 2, 3, 4, 1, 2, 3, 4,", raw=True)
    params = GeneratorParams(30, sampling=SamplingParams(temperature=0.8, seed=5), stop_at_eos=False)
    alone, stats = generate(model, prompt, params)
    engine = BatchEngine(model)
    try:
        tokens, batched = run(engine, {0: [(0, prompt, params)]})[0]
    finally:
        engine.close()
    assert tokens == alone and batched.target_forwards == stats.target_forwards


def test_a_next_turn_reuses_the_rows_a_finished_one_left(models):
    model = models["llama"]
    first = model.encode_prompt("first turn", raw=True)
    engine = BatchEngine(model)
    try:
        tokens, _ = run(engine, {0: [(0, first, GeneratorParams(20, stop_at_eos=False))]})[0]
        second = first + tokens + model.tokenizer.encode(" and more")
        again, stats = run(engine, {0: [(1, second, GeneratorParams(20, stop_at_eos=False))]})[1]
    finally:
        engine.close()
    assert stats.cached_tokens == len(first) + len(tokens) - 1
    assert again == generate(model, second, GeneratorParams(20, stop_at_eos=False))[0]


def test_a_target_only_batch_refuses_speculative_generations(models):
    engine = BatchEngine(models["llama"], speculative=False)
    try:
        with pytest.raises(DovetailError, match="decodes target-only"):
            engine.add([5, 6, 7], GeneratorParams(4))
        assert engine.add([5, 6, 7], GeneratorParams(4, mode="target-only"))
    finally:
        engine.close()


def test_only_exact_graphs_batch(models, monkeypatch):
    model = models["llama"]
    assert batchable(model) is None
    monkeypatch.setattr(model.target, "kernels", False)
    assert "ONNX Runtime's kernels" in batchable(model)
    with pytest.raises(DovetailError, match="cannot batch generations exactly"):
        BatchEngine(model)
