"""Speculative and target-only greedy output equals transformers' greedy, token for token."""
from __future__ import annotations

import pytest

from dovetail_onnx.runtime import GeneratorParams, TreeSettings, generate

PROMPTS = ["hello world", "The quick brown fox jumps over", "1, 2, 3, 4,", "Speculative decoding is"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_speculative_equals_transformers(kind, chat, models, references):
    model = models[kind]
    for text in PROMPTS:
        prompt = model.encode_prompt(text, raw=not chat)
        expected = references(kind, prompt, 48)
        for mode in ("speculative", "target-only"):
            tokens, stats = generate(model, prompt, GeneratorParams(max_new_tokens=48, mode=mode, stop_at_eos=False))
            assert tokens == expected, (mode, text)
            assert stats.new_tokens == 48


@pytest.mark.parametrize("tree", [TreeSettings(1, 1, 2), TreeSettings(4, 3, 8), TreeSettings(16, 6, 40),
                                  TreeSettings(4, 3, 8, min_prob=0.01),
                                  TreeSettings(4, 3, 8, step_ms=(1.0, 1.0, 1.0, 1.1, 1.3, 1.2, 1.5, 1.5))])
def test_any_tree_shape_is_lossless(tree, models, references):
    prompt = models["llama"].encode_prompt("tree shapes", raw=True)
    tokens, _ = generate(models["llama"], prompt, GeneratorParams(max_new_tokens=40, tree=tree, stop_at_eos=False))
    assert tokens == references("llama", prompt, 40)


def test_min_prob_leaves_unlikely_nodes_unexpanded(models, references):
    """No path of a random drafter is likely: with a high `min_prob` each step drafts in its one extending forward."""
    prompt = models["llama"].encode_prompt("few forwards", raw=True)
    for min_prob, one_forward_a_step in ((0.0, False), (0.9, True)):
        params = GeneratorParams(max_new_tokens=30, tree=TreeSettings(4, 3, 8, min_prob), stop_at_eos=False)
        tokens, stats = generate(models["llama"], prompt, params)
        assert tokens == references("llama", prompt, 30)
        assert (stats.draft_forwards == stats.target_forwards) == one_forward_a_step


def test_cost_sizing_sizes_each_step_and_stays_lossless(models, references, monkeypatch):
    """A random drafter is never sure: where one more row costs a lot every step verifies its root alone, where
    rows cost nothing every tree is full."""
    model = models["llama"]
    prompt = model.encode_prompt("sized trees", raw=True)
    forward, sizes = model.target.forward, []
    monkeypatch.setattr(model.target, "forward", lambda tokens, *args: sizes.append(len(tokens)) or forward(tokens, *args))
    for step_ms, size in (((1.0, *[5.0] * 7), 1), ((1.0,) * 8, 8)):
        params = GeneratorParams(max_new_tokens=30, tree=TreeSettings(4, 3, 8, step_ms=step_ms), stop_at_eos=False,
                                 lookup=False)
        sizes.clear()
        tokens, stats = generate(model, prompt, params)
        assert tokens == references("llama", prompt, 30)
        assert sizes[1:] == [size] * stats.target_forwards  # sizes[0] is the prefill


@pytest.mark.parametrize("mode", ["speculative", "target-only"])
def test_stops_at_eos_like_transformers(mode, models):
    """Output stops right after the first EOS id, which it includes (as transformers does)."""
    model = models["qwen2"]
    prompt = model.encode_prompt("hello", raw=True)
    full, _ = generate(model, prompt, GeneratorParams(max_new_tokens=60, stop_at_eos=False))
    eos = full[10]
    tokens, _ = generate(model, prompt, GeneratorParams(max_new_tokens=60, mode=mode, eos_token_ids=(eos,)))
    assert tokens == full[: full.index(eos) + 1]


def test_cpu_drafter_with_truncated_vocabulary_stays_lossless(hf_dirs, tmp_path, references):
    """The 4-bit CPU drafter whose head scores 40 tokens proposes only those ids; the output is still the target's."""
    from rich.console import Console

    from dovetail_onnx.export.artifact import export_artifact
    from dovetail_onnx.runtime import Model
    from dovetail_onnx.runtime.kernels import rows_library

    export_artifact(hf_dirs["llama"], tmp_path / "a", "random", 1, draft_vocab=40, console=Console(quiet=True))
    model = Model(tmp_path / "a", draft_device="cpu")
    assert model.drafter.graph == ("drafter.int4.rows.onnx" if rows_library()[0] else "drafter.int4.onnx")
    prompt = model.encode_prompt("small head", raw=True)
    model.drafter = Recording(model.drafter)
    tokens, _ = generate(model, prompt, GeneratorParams(max_new_tokens=40, stop_at_eos=False, lookup=False))
    assert tokens == references("llama", prompt, 40)
    assert model.drafter.trees and all((tree.tokens[1:] < 40).all() for tree in model.drafter.trees)


class Recording:
    """Wraps a drafter and keeps every tree it proposes."""

    def __init__(self, drafter):
        self.drafter, self.trees = drafter, []

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def propose(self, *args):
        tree, first_copied = self.drafter.propose(*args)
        self.trees.append(tree)
        return tree, first_copied


def test_prompt_lookup_drafts_are_accepted_and_stay_lossless(models, references):
    """The tiny models fall into loops, which prompt lookup copies: accepted, and the output is the target's."""
    copied = 0
    for kind, model in models.items():
        for text in PROMPTS:
            prompt = model.encode_prompt(text, raw=True)
            tokens, stats = generate(model, prompt, GeneratorParams(max_new_tokens=60, stop_at_eos=False))
            assert tokens == references(kind, prompt, 60)
            copied += stats.accepted_copied
    assert copied > 0


def test_quantized_target_with_lookup_chains_equals_its_target_only_output(quantized):
    """Copied chains skip the drafter, which then reads the accepted tokens later: output stays the target's."""
    copied = 0
    for model in quantized.values():
        for text in PROMPTS:
            prompt = model.encode_prompt(text, raw=True)
            params = GeneratorParams(max_new_tokens=60, stop_at_eos=False)
            expected, _ = generate(model, prompt, GeneratorParams(max_new_tokens=60, mode="target-only",
                                                                  stop_at_eos=False))
            tokens, stats = generate(model, prompt, params)
            assert tokens == expected
            copied += stats.accepted_copied
    assert copied > 0
