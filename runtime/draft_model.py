"""A standalone small LM of the target's tokenizer as the drafter (`export --draft-model`).

Any model a user brings gets a drafter this way, with no training: a smaller sibling of the target (Qwen2.5-Coder
0.5B for 1.5B) proposes the tree. Its graph has the target's contract (export/target.py: explicit positions, an
additive bias, K/V written in place), so it runs as a `Target` of its own: its cache holds the accepted tokens,
tree levels are written after them and dropped by the next step, and each level's rows see their own ancestors
only. Candidates are ranked as the trained drafter's are (cumulative log-probability, `min_prob`; `grow_tree`).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from dovetail_onnx.runtime.buffers import PREFILL_CHUNK
from dovetail_onnx.runtime.drafter import grow_tree
from dovetail_onnx.runtime.manifest import Manifest, TreeSettings
from dovetail_onnx.runtime.target import Target
from dovetail_onnx.runtime.tree import Tree, additive, causal


def top_candidates(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `k` likeliest tokens, best first, and their log-probabilities."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(logp, ids, axis=-1), axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=-1)
    return ids, np.take_along_axis(logp, ids, axis=-1)


class DraftModel:
    """Proposes a token tree from the accepted tokens, reading no target features."""

    reads_features = False  # its cache row i holds token i (a trained drafter's pairs feature i with token i + 1)

    def __init__(self, manifest: Manifest, device: str, threads: int | None):
        self.spec, self.max_top_k = manifest.draft_model, manifest.max_top_k
        self.lm = Target(manifest.folder / self.spec.file, self.spec, threads, device=device, role="draft model")
        self.session, self.device, self.graph = self.lm.session, self.lm.device, self.lm.graph.name
        self.forwards = 0

    @property
    def cached(self) -> int:
        return self.lm.cached

    def forget(self) -> None:
        if self.lm.kv:
            self.lm.kv.length = 0

    def start(self, capacity: int, settings: TreeSettings, keep: int = 0) -> None:
        """Rows for `capacity` accepted tokens, of which the first `keep` stay, plus `top_k` a tree level."""
        self.settings = settings
        self.lm.start(capacity + settings.depth * settings.top_k, max(PREFILL_CHUNK, settings.top_k), keep)

    def propose(self, features: np.ndarray, tokens: np.ndarray, total: int | None = None,
                chain: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Tree, int]:
        """Append the newly accepted `tokens` to the model's past, then grow a tree at `tokens[-1]` (see
        `Drafter.propose`; `features` are not read)."""
        settings = self.settings if total is None else replace(self.settings, total_tokens=total)
        kv = self.lm.kv
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            logits, _ = self.lm.forward(chunk, kv.length + np.arange(len(chunk)), causal(len(chunk)))
            kv.keep(np.arange(len(chunk)))
            self.forwards += 1
        stable = kv.length
        if settings.total_tokens < 2:
            return Tree(np.asarray(tokens[-1:], dtype=np.int64), np.array([-1])), 1
        ids, logps = top_candidates(logits[-1:], settings.top_k)

        def expand(level: int, frontier: np.ndarray, parent_rows: np.ndarray, visible: np.ndarray):
            drafted = visible.shape[1] - len(frontier)
            kv.length = stable + drafted  # the last level's rows are the past; `visible` says which a row sees
            mask = additive(visible)
            logits, _ = self.lm.forward(frontier, np.full(len(frontier), stable + level - 1),
                                        mask[None, None, :, drafted:], drafted=mask[:, :drafted])
            self.forwards += 1
            return top_candidates(logits, settings.top_k)

        try:
            return grow_tree(int(tokens[-1]), ids[0], logps[0], 0, settings, expand, chain)
        finally:
            kv.length = stable
