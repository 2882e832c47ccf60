"""Continuous batching: one target forward verifies the trees (or prompt chunks) of every running generation.

The generations share the target's KV buffer. Each owns the rows of its kept tokens, and the attention bias lets a
row see its own generation's rows and its tree ancestors only. dovetail's kernels compute every row alike whatever
else runs with it (TreeAttention sums keys in order and a masked key adds exactly nothing; the row kernels sum each
row in a fixed order), so a generation's tokens are exactly those it gets alone. New rows are written after all
the others; rows a step rejects stay, masked, until the buffer is compacted. Finished generations leave their rows
behind for a while, so a conversation's next turn prefills only what is new, as `Model` does.

Each generation's drafting runs on its own fork of the drafter (its own KV cache; one session), one after another.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

from dovetail_onnx.runtime.buffers import FLOAT, PREFILL_CHUNK
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.generator import GeneratorParams, Model, Stats, checked, pick
from dovetail_onnx.runtime.lookup import Copier
from dovetail_onnx.runtime.tree import MASKED, Tree
from dovetail_onnx.runtime.verify import accept_greedy, accept_sampled

RETAINED = 4  # finished generations whose rows stay for a next turn to reuse


def batchable(model: Model, speculative: bool = True) -> str | None:
    """Why `model` cannot batch generations exactly (None: it can); `speculative` False: target-only ones."""
    target = model.target
    if not target.kernels:
        return "the target runs on ONNX Runtime's kernels, whose rows depend on the rows run with them"
    if target.verify != "tree":
        return "its kernel graph was not checked to verify trees (re-export it)"
    if target.spec.sliding_window:
        return "its attention has a sliding window, which the shared buffer's row order does not give"
    if speculative and model.manifest.draft_model:
        return "a draft model drafts for it"
    return None


@dataclass(eq=False)
class Sequence:
    """One generation in the batch: the state `_speculative` keeps in its locals, held between steps."""

    prompt: np.ndarray
    params: GeneratorParams
    rows: np.ndarray  # buffer rows of its kept tokens, in token order
    features: list[np.ndarray]  # the target's hidden state of each kept token, in order
    stats: Stats = field(default_factory=Stats)
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.sampling.seed)
        self.history = self.prompt.tolist()
        self.prefilled = len(self.rows)
        self.drafter = None
        self.copier = None
        self.next_tokens = self.prompt[:0]
        self.pending_features: np.ndarray | None = None
        self.pending = None
        self.first_token_at: float | None = None


@dataclass
class Retained:
    history: list[int]
    rows: np.ndarray
    features: np.ndarray


class BatchEngine:
    """Steps every running generation together: `add` one, `step` them all, `remove` one."""

    def __init__(self, model: Model, max_rows: int = PREFILL_CHUNK, capacity: int = 1024, speculative: bool = True):
        """`speculative` False: every generation decodes target-only (a draft model's artifact batches then too)."""
        if why := batchable(model, speculative):
            raise DovetailError(f"this artifact cannot batch generations exactly: {why}")
        if not model.lock.acquire(blocking=False):
            raise DovetailError("the model is busy with another generation; load a second Model to batch on")
        self.model, self.max_rows, self.speculative = model, max_rows, speculative
        self.target = model.target
        self.target.start(capacity, max_rows)
        self.target.kv.length = 0
        self.active: list[Sequence] = []
        self.retained: list[Retained] = []

    def close(self) -> None:
        self.model.lock.release()

    def add(self, prompt: list[int], params: GeneratorParams) -> Sequence:
        """Admit a generation (checked as `Generator` checks it). Greedy ones reuse the longest prompt prefix a
        finished one left behind."""
        model = self.model
        params = checked(model, params, prompt)
        if params.mode == "speculative" and not self.speculative:
            raise DovetailError("this batch decodes target-only; ask for mode='target-only'")
        prompt = np.asarray(prompt, dtype=np.int64)
        keep, source = 0, None
        if params.sampling.greedy:
            for entry in self.retained:
                held = np.asarray(entry.history[: len(prompt)], dtype=np.int64)
                differs = np.flatnonzero(held != prompt[: len(held)])
                common = int(differs[0]) if len(differs) else len(held)
                usable = max(0, min(common - 1, len(entry.rows)))  # one token at least is prefilled again
                if usable > keep:
                    keep, source = usable, entry
        rows = source.rows[:keep].copy() if source else np.zeros(0, dtype=np.int64)
        features = [source.features[:keep]] if source else []
        seq = Sequence(prompt, params, rows, features)
        seq.stats.cached_tokens = keep
        if params.mode == "speculative":
            tree = params.tree
            seq.copier = Copier(min(tree.total_tokens - 1, tree.depth)) if params.lookup else None
            if model.drafter:
                seq.drafter = copy.copy(model.drafter)  # the session, shared; a KV cache of its own
                seq.drafter.kv = None
                seq.drafter.start(len(prompt) + params.max_new_tokens + tree.total_tokens, tree)
        self.active.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Drop a generation (finished, cancelled or disconnected); its rows stay for a next turn to reuse."""
        self.active.remove(seq)
        if seq.params.sampling.greedy and len(seq.rows):
            self.retained.insert(0, Retained(seq.history, seq.rows, np.concatenate(seq.features)))
            del self.retained[RETAINED:]

    def step(self) -> dict[Sequence, list[int]]:
        """One target forward over every running generation's next rows; returns each one's new tokens."""
        items, budget = [], self.max_rows
        decoding = [seq for seq in self.active if seq.prefilled == len(seq.prompt)]
        for seq in decoding:  # every decoding generation steps; prompts take the rows left over
            tree, first_copied = self._draft(seq, alone=len(decoding) == 1)
            items.append((seq, tree, first_copied))
            budget -= len(tree)
        for seq in self.active:
            if seq.prefilled < len(seq.prompt) and budget > 0:
                chunk = seq.prompt[seq.prefilled : seq.prefilled + min(budget, PREFILL_CHUNK)]
                items.append((seq, Tree(chunk, np.arange(len(chunk)) - 1), None))
                budget -= len(chunk)
        if not items:
            return {}
        rows = sum(len(tree) for _, tree, _ in items)
        self._make_room(rows)
        kv = self.target.kv
        past = kv.length
        tokens = np.concatenate([tree.tokens for _, tree, _ in items])
        positions = np.concatenate([len(seq.rows) + tree.depth for seq, tree, _ in items])
        new = np.full((rows, rows), MASKED, dtype=FLOAT)
        seen = np.full((rows, past), MASKED, dtype=FLOAT)
        start = 0
        for seq, tree, _ in items:
            span = slice(start, start + len(tree))
            new[span, span] = tree.mask()[0, 0]
            seen[span.start : span.stop, seq.rows] = 0.0
            start += len(tree)
        t0 = time.perf_counter()
        logits, hidden = self.target.forward(tokens, positions, new[None, None], drafted=seen)
        elapsed = time.perf_counter() - t0
        kv.length = past + rows
        out, start = {}, 0
        for seq, tree, first_copied in items:
            span = slice(start, start + len(tree))
            start += len(tree)
            if first_copied is None:
                out[seq] = self._prefilled(seq, logits[span], hidden[span], past + span.start)
            else:
                out[seq] = self._accept(seq, tree, first_copied, logits[span], hidden[span], past + span.start)
                seq.stats.verify_s += elapsed
        for seq, new_tokens in out.items():
            self._emit(seq, new_tokens)
        return out

    def _draft(self, seq: Sequence, alone: bool) -> tuple[Tree, int]:
        """The tree this generation verifies next: as `_speculative` drafts it while it decodes `alone`, else a lone
        root (and always in target-only mode).

        Speculation and batching share the same spare compute: with several generations decoding, one more batched
        row is a cheaper token than a drafted one (measured: docs/benchmarks.md, "Serving"), and the drafter runs
        each generation's forwards one after another. The drafter reads the tokens it missed when it runs again."""
        root = Tree(np.array(seq.history[-1:], dtype=np.int64), np.array([-1]))
        if seq.params.mode != "speculative" or not alone:
            if seq.drafter:
                seq.pending = (seq.pending_features, seq.next_tokens)
            return root, 1
        t0 = time.perf_counter()
        drafter, tree_settings = seq.drafter, seq.params.tree
        drafted = drafter.forwards if drafter else 0
        copied = seq.copier.propose(np.asarray(seq.history)) if seq.copier else None
        chains = self.target.verify == "chain" or not drafter
        if chains and copied is not None and len(copied[0]) or not drafter:
            tree, first = root.graft(copied[0])
            seq.pending = (seq.pending_features, seq.next_tokens) if drafter else None
        else:
            tree, first = drafter.propose(seq.pending_features, seq.next_tokens, tree_settings.total_tokens, copied)
            seq.pending = None
        seq.stats.draft_s += time.perf_counter() - t0
        seq.stats.draft_forwards += drafter.forwards - drafted if drafter else 0
        return tree, first

    def _prefilled(self, seq: Sequence, logits: np.ndarray, hidden: np.ndarray, first_row: int) -> list[int]:
        """A prompt chunk went through: keep its rows; after the last one, the first new token."""
        seq.rows = np.concatenate((seq.rows, first_row + np.arange(len(logits))))
        seq.features.append(hidden.copy())
        seq.prefilled += len(logits)
        if seq.prefilled < len(seq.prompt):
            return []
        token = pick(logits[-1:], seq.params.sampling, seq.rng)
        seq.stats.prefill_s = time.perf_counter() - seq.started
        # The drafter reads (feature of token i, token i + 1): the whole prompt's, then the first token.
        seq.pending_features = np.concatenate(seq.features)
        seq.next_tokens = np.append(seq.prompt[1:], token)
        return [token]

    def _accept(self, seq: Sequence, tree: Tree, first_copied: int, logits: np.ndarray, hidden: np.ndarray,
                first_row: int) -> list[int]:
        sampling = seq.params.sampling
        if sampling.greedy:
            path, bonus = accept_greedy(tree, logits.argmax(axis=-1))
        else:
            path, bonus = accept_sampled(tree, sampling.probs(logits), seq.rng)
        seq.rows = np.concatenate((seq.rows, first_row + np.asarray(path)))
        seq.features.append(hidden[path].copy())
        emitted = np.append(tree.tokens[path[1:]], bonus)
        if seq.copier:
            seq.copier.update(emitted)
        features, next_tokens = hidden[path].copy(), emitted
        if seq.pending:
            features = np.concatenate((seq.pending[0], features))
            next_tokens = np.concatenate((seq.pending[1], emitted))
        seq.pending_features, seq.next_tokens = features, next_tokens
        seq.stats.target_forwards += 1
        seq.stats.accepted.append(len(path))
        seq.stats.accepted_copied += sum(node >= first_copied for node in path[1:])
        return emitted.tolist()

    def _emit(self, seq: Sequence, new: list[int]) -> None:
        """Trim at EOS and the token budget, as `Generator.generate_next_token` does."""
        params = seq.params
        new[:] = new[: params.max_new_tokens - len(seq.tokens)]
        if params.stop_at_eos:
            for i, token in enumerate(new):
                if token in params.eos_token_ids:
                    del new[i + 1 :]
                    seq.done = True
                    break
        seq.tokens += new
        seq.history += new
        seq.stats.new_tokens = len(seq.tokens)
        now = time.perf_counter()
        if seq.first_token_at is None and new:
            seq.first_token_at = now
        elif seq.first_token_at is not None:
            seq.stats.decode_s = now - seq.first_token_at
        if len(seq.tokens) >= params.max_new_tokens:
            seq.done = True

    def _make_room(self, rows: int) -> None:
        """Rows for the next forward: compact the live rows (running and retained) to the front when the buffer
        is full or more than half of it is rejected rows (every row's attention reads the whole past, masked keys
        included), dropping retained ones if that is not enough, and grow it as the last resort."""
        kv = self.target.kv
        owners = self.active + self.retained
        live = np.unique(np.concatenate([o.rows for o in owners] + [np.zeros(0, dtype=np.int64)]))
        if kv.length + rows <= kv.capacity and kv.length <= 2 * len(live):
            return
        while len(live) + rows > kv.capacity and self.retained:
            self.retained.pop()
            owners = self.active + self.retained
            live = np.unique(np.concatenate([o.rows for o in owners] + [np.zeros(0, dtype=np.int64)]))
        for buf in kv.buffers:
            buf[:, :, : len(live)] = buf[:, :, live]
        for owner in owners:
            owner.rows = np.searchsorted(live, owner.rows)
        kv.length = len(live)
        if kv.length + rows > kv.capacity:
            self.target.start(2 * (kv.length + rows), self.max_rows, kv.length)
