"""One tree forward of the target equals sequential decoding along every root-to-leaf path."""
from __future__ import annotations

import numpy as np
import pytest

from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.target import Target
from dovetail_onnx.runtime.tree import Tree, causal

# A tree with branches at several depths: node: parent
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 3, 5, 8, 0]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "int8", "int4"])
def test_every_path_matches_sequential_logits(kind, models, quantized):
    """fp32 rows may differ in the last bits (other blocking in attention and GEMMs). Quantized targets verify
    chains and run ≥ 2 query rows in attention (export/target.py): a lone row or a branch would land ~0.5 apart."""
    manifest = (models | quantized)[kind].manifest
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, manifest.target.vocab_size, 9)
    parents = PARENTS if manifest.target.verify == "tree" else list(range(-1, len(PARENTS) - 1))
    tree = Tree(rng.integers(0, manifest.target.vocab_size, len(parents)), np.array(parents))

    target = Target(manifest.folder / manifest.target.file, manifest.target, threads=1)
    target.start(64, len(tree))
    target.prefill(prompt)
    past = target.kv.length
    tree_logits, _ = target.forward(tree.tokens, past + tree.depth, tree.mask())
    tree_logits = tree_logits.copy()

    zero = np.zeros((1, 1, 1, 1), dtype=np.float32)
    for path in tree.paths():
        target.start(64, len(tree))
        target.prefill(prompt)
        for node in path:
            logits, _ = target.forward(tree.tokens[[node]], np.array([target.kv.length]), zero)
            target.kv.keep(np.arange(1))
            np.testing.assert_allclose(logits[0], tree_logits[node], atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_lone_row_equals_row_of_two(precision, quantized):
    """After a past, a one-token forward of a quantized graph gives row 0 of a two-token forward bit for bit:
    the graph pads the lone query row inside its attention, and its weights' kernels run one row alike
    (or, on a CPU where they do not, the runtime pads every forward to an exact row multiple)."""
    manifest = quantized[precision].manifest
    assert (manifest.target.attention_rows, manifest.target.min_rows) == (2, 1)
    rng = np.random.default_rng(3)
    target = Target(manifest.folder / manifest.target.file, manifest.target, threads=1)
    target.start(64, 2)
    target.prefill(rng.integers(0, manifest.target.vocab_size, 11))
    past, tokens = target.kv.length, rng.integers(0, manifest.target.vocab_size, 2)
    one = target.forward(tokens[:1], np.array([past]), np.zeros((1, 1, 1, 1), np.float32))[0].copy()
    two = target.forward(tokens, past + np.arange(2), causal(2))[0]
    np.testing.assert_array_equal(one[0], two[0])


def test_quantized_target_pads_forwards_to_the_row_multiple_that_is_exact(quantized, monkeypatch, caplog):
    """Where ORT's kernels compute a row by how many run with it (MatMulNBits int4 at block 128 on an AVX-512 EPYC:
    an odd last row), every forward of the graph on them runs a multiple of the least row count that is exact; it
    says so when the exporting CPU needed fewer."""
    monkeypatch.setattr(Target, "_chains_exact", lambda self, tokens: self.row_step >= 2)
    manifest = quantized["int4"].manifest
    for exported, note in ((1, True), (2, False)):
        spec = manifest.target.model_copy(update={"row_step": exported})
        target = Target(manifest.folder / manifest.target.file, spec, threads=1, kernels=False)
        assert target.row_step == 2
        assert ("runs a multiple of 2 rows" in caplog.text) == note
        caplog.clear()
    target.start(16, 3)
    for rows in (1, 3):
        logits, _ = target.forward(np.arange(rows) + 5, np.arange(rows), causal(rows))
        assert logits.shape == (rows, manifest.target.vocab_size)


def test_quantized_target_whose_rows_are_never_exact_is_refused(quantized, monkeypatch):
    monkeypatch.setattr(Target, "_chains_exact", lambda self, tokens: False)
    manifest = quantized["int4"].manifest
    with pytest.raises(DovetailError, match="re-export with another --block-size"):
        Target(manifest.folder / manifest.target.file, manifest.target, threads=1, kernels=False)


def test_kept_rows_continue_like_sequential(models):
    """After keeping a path's K/V rows (compaction), the next forward sees exactly that path."""
    manifest = models["llama"].manifest
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, manifest.target.vocab_size, 7)
    tree = Tree(rng.integers(0, manifest.target.vocab_size, len(PARENTS)), np.array(PARENTS))
    path = tree.paths()[3]
    nxt = rng.integers(0, manifest.target.vocab_size, 1)
    zero = np.zeros((1, 1, 1, 1), dtype=np.float32)

    target = Target(manifest.folder / manifest.target.file, manifest.target, threads=1)
    target.start(64, len(tree))
    target.prefill(prompt)
    target.forward(tree.tokens, target.kv.length + tree.depth, tree.mask())
    target.kv.keep(np.array(path))
    after_tree = target.forward(nxt, np.array([target.kv.length]), zero)[0].copy()

    target.start(64, len(tree))
    target.prefill(np.concatenate((prompt, tree.tokens[path])))
    sequential = target.forward(nxt, np.array([target.kv.length]), zero)[0]
    np.testing.assert_allclose(after_tree, sequential, atol=1e-4, rtol=0)


def test_tree_rejects_child_before_parent():
    with pytest.raises(ValueError):
        Tree(np.array([1, 2, 3]), np.array([-1, 2, 0]))
