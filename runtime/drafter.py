"""The drafter graph on its device (CUDA when usable) and EAGLE-2 dynamic tree drafting.

The drafter keeps its own KV cache on its device. Its "stable" rows are the accepted tokens, in
step with the target's cache; tree nodes are written after them while drafting and simply
overwritten by the next round, so nothing is ever copied back or compacted. Row i pairs the
target's feature of token i with token i + 1, so it depends on tokens [0, i + 1].
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from onnxruntime import InferenceSession

from dovetail_onnx.runtime.buffers import PREFILL_CHUNK, Buffer, KVCache
from dovetail_onnx.runtime.kernels import rows_library
from dovetail_onnx.runtime.manifest import Manifest, TreeSettings
from dovetail_onnx.runtime.sessions import check_io, open_session, wants_cuda
from dovetail_onnx.runtime.tree import Tree, additive, causal


class Drafter:
    """Proposes a token tree from the target's features of the newly accepted tokens."""

    reads_features = True  # its row i pairs the target's feature of token i with token i + 1

    def __init__(self, manifest: Manifest, device: str, threads: int | None):
        self.spec = manifest.drafter
        self.max_top_k = manifest.max_top_k
        self.session, self.device = self._open(manifest.folder, device, threads)
        spec, top_k = self.spec, self.max_top_k
        kv = {name: {-1: spec.kv_width} for name in KVCache.names(spec.num_layers, "past")}
        new_kv = {name: {-1: spec.kv_width} for name in KVCache.names(spec.num_layers, "new")}
        check_io(self.session, "drafter",
                 {"input_ids": {}, "position_ids": {}, "attention_mask": {}, "hidden_index": {},
                  "hidden_states": {-1: spec.hidden_size}, **kv},
                 {"out_hidden": {-1: spec.hidden_size}, "topk_ids": {-1: top_k}, "topk_logprobs": {-1: top_k}, **new_kv})
        self.kv: KVCache | None = None
        self.forwards = 0  # drafter forwards so far (bench --profile divides drafting time by them)

    def _open(self, folder: Path, device: str, threads: int | None) -> tuple[InferenceSession, str]:
        """The fp32 graph on CUDA; on a CPU the quantized one (`cpu_file`, drafting faster there), on dovetail's row
        kernel where the artifact has that graph and the kernels build."""
        spec = self.spec
        if wants_cuda(device) or not spec.cpu_file:
            self.graph = spec.file
            session, used = open_session(folder / self.graph, device, threads, "drafter", spin=False)
            if used == "cuda" or not spec.cpu_file:
                return session, used
        library = rows_library()[0] if spec.kernel_file else None
        self.graph = spec.kernel_file if library else spec.cpu_file
        return open_session(folder / self.graph, "cpu", threads, "drafter", spin=False,
                            libraries=(library,) if library else ())

    @property
    def cached(self) -> int:
        """Stable rows the last generation left (those of the accepted tokens)."""
        return self.kv.length if self.kv else 0

    def forget(self) -> None:
        """Drop the stable rows: a generation that does not feed the drafter moves the history past them."""
        if self.kv:
            self.kv.length = 0

    def start(self, capacity: int, settings: TreeSettings, keep: int = 0) -> None:
        """Set up a generation: stable rows for `capacity` positions, of which the first `keep` stay, plus tree rows."""
        rows = capacity + settings.depth * settings.top_k
        if self.kv is None:
            self.kv = KVCache(self.spec.num_layers, self.spec.kv_width, rows, self.device)
        self.kv.reserve(rows, keep)
        width = max(PREFILL_CHUNK, settings.top_k)
        # Two feature buffers: each step reads its parents' rows from the one the last step wrote.
        self.features = [Buffer(width, self.spec.hidden_size, self.device) for _ in range(2)]
        self.ids = Buffer(width, self.max_top_k, "cpu", np.int64)
        self.logprobs = Buffer(width, self.max_top_k, "cpu")
        self.binding = self.session.io_binding()
        self.settings = settings

    def _run(self, tokens, positions, mask, past: int, index: np.ndarray, features: np.ndarray | None, out: int):
        """One drafter forward; features come from the host (`features`) or from buffer `1 - out`."""
        seq = len(tokens)
        b = self.binding
        if features is None:
            src = self.features[1 - out]
            src.bind_input(b, "hidden_states", 0, [1, src.rows, self.spec.hidden_size])
        else:
            b.bind_cpu_input("hidden_states", np.ascontiguousarray(features, dtype=np.float32)[None])
        b.bind_cpu_input("hidden_index", np.ascontiguousarray(index, dtype=np.int64))
        b.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64)[None])
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64)[None])
        b.bind_cpu_input("attention_mask", mask)
        self.kv.bind(b, past, seq)
        self.features[out].bind_output(b, "out_hidden", 0, [1, seq, self.spec.hidden_size])
        self.ids.bind_output(b, "topk_ids", 0, [1, seq, self.max_top_k])
        self.logprobs.bind_output(b, "topk_logprobs", 0, [1, seq, self.max_top_k])
        self.session.run_with_iobinding(b)
        self.forwards += 1
        return self.ids.array[:seq], self.logprobs.array[:seq]

    def propose(self, features: np.ndarray, tokens: np.ndarray, total: int | None = None,
                chain: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Tree, int]:
        """Extend the drafter's past with (feature_i, token_{i+1}) pairs, then grow a tree at `tokens[-1]`
        (`grow_tree`, EAGLE-2's rule). `total` (default: the tree settings') of 1 only extends the past. A
        prompt-lookup `chain` (tokens, cumulative log-probs) competes for the same places (see `best_tree`).
        Returns the tree and its first node copied from the chain (its length when none is).
        """
        total = self.settings.total_tokens if total is None else total
        out = 0
        for start in range(0, len(tokens), PREFILL_CHUNK):
            out = 1 - out
            chunk = tokens[start : start + PREFILL_CHUNK]
            base = self.kv.length
            ids, logps = self._run(chunk, base + np.arange(len(chunk)), causal(len(chunk)), base,
                                   np.arange(len(chunk)), features[start : start + len(chunk)], out)
            self.kv.length += len(chunk)
        stable = self.kv.length
        if total < 2:
            return Tree(np.asarray(tokens[-1:], dtype=np.int64), np.array([-1])), 1

        def expand(level: int, frontier: np.ndarray, parent_rows: np.ndarray, visible: np.ndarray):
            nonlocal out  # each level reads its parents' features from the buffer the last one wrote
            out = 1 - out
            past = stable + (level - 1) * self.settings.top_k
            return self._run(frontier, np.full(len(frontier), stable + level - 1), additive(visible)[None, None], past,
                             parent_rows, None, out)

        settings = replace(self.settings, total_tokens=total)
        return grow_tree(int(tokens[-1]), ids[-1], logps[-1], len(chunk) - 1, settings, expand, chain)


def grow_tree(root: int, ids: np.ndarray, logps: np.ndarray, root_row: int, settings: TreeSettings, expand,
              chain: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Tree, int]:
    """EAGLE-2's dynamic tree from the root's candidates (`ids`, `logps`, best first), shared by every drafter.

    Expand the `top_k` best nodes by cumulative log-prob at each of `depth` levels, then keep the `total_tokens - 1`
    best candidates overall (a parent always outranks its child). Only frontier nodes that outscore the current cut
    (the `total - 1`-th best candidate so far) are expanded: the cut only rises and a child never outscores its
    parent, so the others' descendants could never enter the tree. Nodes below `min_prob` are not expanded either:
    their children cannot add enough to pay for a forward. A level with none ends the drafting.
    `expand(level, tokens, parent_rows, visible)` runs one forward over a level's frontier: each row's token, the
    row of the last forward that holds its parent (`root_row` for the root), and which drafted slots it sees
    (`[rows, slots so far + rows]`, slots `top_k` a level); it returns each row's candidate ids and log-probs.
    """
    top_k, depth, total = settings.top_k, settings.depth, settings.total_tokens
    # Candidate nodes (root excluded): token, parent (-1 = root), cumulative log-prob, draft KV slot.
    cand_tokens = list(ids[:top_k])
    cand_parent = [-1] * top_k
    cand_score = list(logps[:top_k].astype(np.float64))
    frontier = np.arange(top_k)
    parent_rows = np.full(top_k, root_row)
    slots = np.full(top_k, -1)
    min_logp = np.log(settings.min_prob) if settings.min_prob > 0 else -np.inf
    for level in range(1, depth):
        scores = np.array(cand_score)
        promising = scores[frontier] >= min_logp
        if len(cand_score) >= total - 1:
            promising &= scores[frontier] > -np.partition(-scores, total - 2)[total - 2]
        frontier, parent_rows = frontier[promising], parent_rows[promising]
        if not len(frontier):
            break
        rows, drafted = len(frontier), (level - 1) * top_k
        slots[frontier] = drafted + np.arange(rows)
        visible = np.zeros((rows, drafted + rows), dtype=bool)
        for row, node in enumerate(frontier):
            while node >= 0:
                visible[row, slots[node]] = True
                node = cand_parent[node]
        ids, logps = expand(level, np.array(cand_tokens)[frontier], parent_rows, visible)
        scores = np.array(cand_score)[frontier][:, None] + logps[:, :top_k]
        best = np.argsort(-scores.ravel(), kind="stable")[:top_k]
        first = len(cand_tokens)
        cand_tokens += list(ids[:, :top_k].ravel())
        cand_parent += list(np.repeat(frontier, top_k))
        cand_score += list(scores.ravel())
        slots = np.concatenate((slots, np.full(rows * top_k, -1)))
        frontier = first + best
        parent_rows = best // top_k
    return best_tree(root, np.array(cand_tokens), np.array(cand_parent), np.array(cand_score), settings, chain)


def best_tree(root: int, tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray, settings: TreeSettings,
              chain: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Tree, int]:
    """The tree of the best candidates (parent −1 = root) and prompt-lookup chain nodes by score, as many as
    `settings.sized` gives (`total_tokens - 1` unless a step cost was measured).

    The chain's leading tokens that the candidates already hold as a path from the root take the better of the
    two scores; the rest of the chain hangs below as new candidates. Scores fall along every path, so the best
    nodes always include their parents. Returns the tree and its first node copied from the chain.
    """
    drafted = len(tokens)
    if chain is not None and len(chain[0]):
        scores = scores.copy()
        node, new_tokens, new_parents, new_scores = -1, [], [], []
        for token, score in zip(*chain):
            match = np.flatnonzero((parents == node) & (tokens == token)) if node < drafted else []
            if len(match):
                node = int(match[0])
                scores[node] = max(scores[node], score)
            else:
                new_tokens.append(token)
                new_parents.append(node)
                new_scores.append(score)
                node = drafted + len(new_tokens) - 1
        tokens = np.concatenate((tokens, np.asarray(new_tokens, dtype=np.int64)))
        parents = np.concatenate((parents, np.asarray(new_parents, dtype=np.int64)))
        scores = np.concatenate((scores, new_scores))
    ranked = np.argsort(-scores, kind="stable")
    keep = np.sort(ranked[: settings.sized(scores[ranked]) - 1])
    node_of = {-1: 0, **{int(c): i + 1 for i, c in enumerate(keep)}}
    tree = Tree(np.array([root, *tokens[keep]], dtype=np.int64), np.array([-1] + [node_of[parents[c]] for c in keep]))
    return tree, 1 + int(np.sum(keep < drafted))
