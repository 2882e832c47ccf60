"""An oracle drafter that knows the target's continuation exercises acceptance and KV compaction.

A random drafter accepts almost nothing. This one puts the true continuation in the tree at varied
depths, hidden among wrong siblings and wrong subtrees placed before it, so the accepted path is
rarely the first branch and the kept K/V rows are rarely contiguous.
"""
from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from dovetail_onnx.export.artifact import export_artifact
from dovetail_onnx.runtime import DovetailError, GeneratorParams, Model, TreeSettings, generate
from dovetail_onnx.runtime.target import Target
from dovetail_onnx.runtime.tree import Tree


class OracleDrafter:
    """Same interface as runtime.drafter.Drafter: start(capacity, settings, keep), propose(features, tokens)."""

    cached = 0  # keeps no rows between generations
    forwards = 0  # runs no graph
    reads_features = True  # its tokens come paired with features, as the trained drafter's do

    def __init__(self, prompt: list[int], continuation: list[int], vocab: int, seed: int = 0, chain: bool = False):
        self.sequence, self.chain = prompt + continuation, chain
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.device = "cpu"

    def start(self, capacity, settings, keep=0) -> None:
        self.seen = 1  # tokens of `sequence` the runtime has handed over (the prompt's first is implicit)

    def wrong(self, token: int) -> int:
        return int((token + 1 + self.rng.integers(self.vocab - 1)) % self.vocab)

    def propose(self, features: np.ndarray, tokens: np.ndarray, total: int | None = None,
                chain=None) -> tuple[Tree, int]:
        assert np.array_equal(tokens, self.sequence[self.seen : self.seen + len(tokens)])
        self.seen += len(tokens)
        truth = self.sequence[self.seen : self.seen + int(self.rng.integers(2, 7))]
        nodes, parents = [int(tokens[-1])], [-1]

        def add(token: int, parent: int) -> int:
            nodes.append(token)
            parents.append(parent)
            return len(nodes) - 1

        parent = 0
        for token in truth:
            if not self.chain:
                decoy = add(self.wrong(token), parent)  # a wrong sibling first, with a child of its own
                add(self.wrong(token), decoy)
            parent = add(token, parent)
        add(self.wrong(0), parent)  # the path always ends in a wrong guess
        return Tree(np.array(nodes, dtype=np.int64), np.array(parents)), len(nodes)


def test_oracle_accepts_many_tokens_and_stays_exact(models, references):
    for kind, model in models.items():
        prompt = model.encode_prompt("An oracle knows what comes next", raw=False)
        expected = references(kind, prompt, 120)
        saved = model.drafter
        model.drafter = OracleDrafter(prompt, expected, model.manifest.target.vocab_size)
        try:
            tokens, stats = generate(model, prompt, GeneratorParams(max_new_tokens=120, stop_at_eos=False, lookup=False))
        finally:
            model.drafter = saved
        assert tokens == expected
        assert stats.mean_accepted >= 3.0, stats.as_dict()


def assert_oracle_chain_exact(model, label: str, chain: bool = True) -> None:
    """A quantized target is its own model: lossless means its target-only tokens, with many accepted. `chain`:
    the oracle drafts chains; else trees with wrong branches before the right one."""
    prompt = model.encode_prompt("An oracle knows what comes next", raw=False)
    expected, _ = generate(model, prompt, GeneratorParams(max_new_tokens=120, mode="target-only", stop_at_eos=False))
    saved = model.drafter
    model.drafter = OracleDrafter(prompt, expected, model.manifest.target.vocab_size, chain=chain)
    # The oracle's trees run up to 20 nodes: room for them (the runtime sizes the KV cache by the tree's budget).
    tree = None if chain else TreeSettings(top_k=3, depth=7, total_tokens=24)
    try:
        tokens, stats = generate(model, prompt, GeneratorParams(max_new_tokens=120, stop_at_eos=False, lookup=False,
                                                                tree=tree))
    finally:
        model.drafter = saved
    assert tokens == expected, label
    assert stats.mean_accepted >= 3, label


def test_quantized_target_speculative_equals_its_own_target_only_output(quantized):
    for precision, model in quantized.items():
        assert_oracle_chain_exact(model, precision)


def test_quantized_target_verifies_trees_on_dovetails_kernels(quantized):
    """TreeAttention computes a tree row as its token decoded alone, so there a quantized target's trees are exact."""
    for precision, model in quantized.items():
        if model.target.graph.name != "target.rows.onnx":
            pytest.skip("dovetail's kernels do not run here")
        assert model.manifest.target.kernel_verify == "tree" and model.target.verify == "tree"
        assert_oracle_chain_exact(model, precision, chain=False)


def test_another_quantization_block_stays_exact(quantized, hf_dirs, tmp_path):
    """Block sizes take other MatMulNBits paths (SmolLM2's int4 at 128, the default, runs an odd last row unlike the
    others on an AVX-512 EPYC); the export's check and the runtime's row check keep chains exact at any of them."""
    assert quantized["int4"].manifest.target.block_size == 128
    export_artifact(hf_dirs["llama"], tmp_path / "b32", "random", 1, precision="int4", block_size=32,
                    console=Console(stderr=True, quiet=True))
    model = Model(tmp_path / "b32", draft_device="cpu", threads=1)
    assert model.manifest.target.block_size == 32
    for checked in (model, quantized["int4"]):  # the export recorded the row multiple MatMulNBits needs on this CPU
        spec = checked.manifest.target
        assert Target(checked.manifest.folder / spec.file, spec, threads=1, kernels=False).row_step == spec.row_step
    assert_oracle_chain_exact(model, "int4, block 32")
