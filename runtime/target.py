"""The target graph on the CPU execution provider, its KV cache and its output buffers."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dovetail_onnx.runtime.buffers import FLOAT, PREFILL_CHUNK, SharedKVCache
from dovetail_onnx.runtime.manifest import GraphSpec
from dovetail_onnx.runtime.sessions import check_io, open_session
from dovetail_onnx.runtime.tree import MASKED, causal


class Target:
    """One verify forward per call; the caller decides which new K/V rows to keep.

    The graph is onnxruntime-genai's fused one (export/target.py): attention takes the kept past
    from the shared KV buffers, explicit positions, and an additive bias over past + new rows.
    """

    def __init__(self, path: Path, spec: GraphSpec, threads: int | None):
        self.spec = spec
        self.session, self.device = open_session(path, "cpu", threads, "target")
        names = SharedKVCache.graph_names(spec.num_layers)
        check_io(self.session, "target",
                 {"input_ids": {}, "attention_mask": {}, "position_ids": {}, "attention_bias": {},
                  **{past: {1: spec.kv_heads, 3: spec.head_dim} for past, _ in names}},
                 {"logits": {-1: spec.vocab_size}, "hidden_states": {-1: spec.hidden_size},
                  **{present: {1: spec.kv_heads, 3: spec.head_dim} for _, present in names}})
        self.kv: SharedKVCache | None = None
        self.min_rows = spec.min_rows
        if spec.attention_rows > spec.min_rows and not self._lone_row_exact():
            self.min_rows = 2
            print("note: this CPU's quantized kernels compute one row differently from several; every target "
                  "forward runs two rows so speculative output stays identical to target-only (slower)", file=sys.stderr)

    def _lone_row_exact(self) -> bool:
        """Whether a 1-row forward equals row 0 of a 2-row one bit for bit here. Quantized graphs run a lone token
        as one row only where it does: kernels are chosen by CPU, and a quantized graph amplifies any difference
        (export/target.py). Two forwards of an empty cache, once per session."""
        self.start(2, 2)
        tokens = np.arange(1, 3) % self.spec.vocab_size
        one = self.forward(tokens[:1], np.arange(1), causal(1))[0].copy()
        two = self.forward(tokens, np.arange(2), causal(2))[0]
        return bool(np.array_equal(one[0], two[0]))

    @property
    def cached(self) -> int:
        """Rows of the KV cache the last generation left: K/V of its first tokens."""
        return self.kv.length if self.kv else 0

    def start(self, capacity: int, max_seq: int, keep: int = 0) -> None:
        """Set up a generation: KV for `capacity` positions whose first `keep` rows stay, outputs for `max_seq` rows.

        Everything is bound here once, by pointer: a forward writes its token ids, positions and mask into these
        buffers and rebinds only what changes shape (the mask's width every step, the rows when they change).
        """
        spec = self.spec
        if self.kv is None:
            self.kv = SharedKVCache(spec.num_layers, spec.kv_heads, spec.head_dim, capacity)
        # A padded forward (min_rows, attention_rows) writes one row past the last position.
        self.kv.reserve(capacity + max(self.min_rows, spec.attention_rows), keep)
        rows = max(max_seq, PREFILL_CHUNK, self.min_rows, spec.attention_rows)
        self.logits = np.zeros((rows, spec.vocab_size), dtype=FLOAT)
        self.hidden = np.zeros((rows, spec.hidden_size), dtype=FLOAT)
        self.ids = np.zeros(rows, dtype=np.int64)
        self.positions = np.zeros(rows, dtype=np.int64)
        self.ones = np.ones(self.kv.capacity, dtype=np.int64)
        self.bias = np.zeros(rows * self.kv.capacity, dtype=FLOAT)
        # Python after a forward runs with caches the weights have flushed: every call costs ~10x its warm time
        # (measured: 0.5 ms between two 1-row forwards), so a step does as few as it can.
        self._ptr = {name: array.ctypes.data for name, array in (
            ("input_ids", self.ids), ("position_ids", self.positions), ("attention_mask", self.ones),
            ("attention_bias", self.bias), ("logits", self.logits), ("hidden_states", self.hidden))}
        self.binding = self.session.io_binding()
        self.kv.bind(self.binding)
        self._bound_rows = 0

    def forward(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run `tokens` after the kept past; `mask` `[1, 1, S, S]` is additive among them (the past is visible).
        Returns views (logits [S, V], hidden [S, H]) valid until the next call.

        Quantized graphs get a padding row when S is 1: in their attention only (`attention_rows` 2), or in the
        whole forward where this CPU computes a lone row differently (`min_rows`). It comes last: no real row sees it.
        """
        seq, past, spec = len(tokens), self.kv.length, self.spec
        rows = max(seq, self.min_rows)
        attention_rows = max(rows, spec.attention_rows)
        total = past + attention_rows
        bias = self.bias[: attention_rows * total].reshape(attention_rows, total)
        bias[:, :past] = 0.0
        bias[:, past:] = MASKED
        bias[:seq, past : past + seq] = mask[0, 0]
        self.ids[:seq] = tokens
        self.positions[:seq] = positions
        if attention_rows > seq:
            pad = np.arange(seq, attention_rows)
            bias[pad, past + pad] = 0.0
            self.ids[seq:rows] = self.ids[seq - 1]
            self.positions[seq:attention_rows] = self.positions[seq - 1] + 1 + np.arange(attention_rows - seq)
        b, ptr = self.binding, self._ptr
        if rows != self._bound_rows:
            b.bind_input("input_ids", "cpu", 0, np.int64, [1, rows], ptr["input_ids"])
            b.bind_input("position_ids", "cpu", 0, np.int64, [1, attention_rows], ptr["position_ids"])
            b.bind_output("logits", "cpu", 0, FLOAT, [1, rows, spec.vocab_size], ptr["logits"])
            b.bind_output("hidden_states", "cpu", 0, FLOAT, [1, rows, spec.hidden_size], ptr["hidden_states"])
            self._bound_rows = rows
        b.bind_input("attention_mask", "cpu", 0, np.int64, [1, total], ptr["attention_mask"])
        b.bind_input("attention_bias", "cpu", 0, FLOAT, [1, 1, attention_rows, total], ptr["attention_bias"])
        self.session.run_with_iobinding(b)
        return self.logits[:seq], self.hidden[:seq]

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Process `tokens` after the kept past; returns (last logits [V], hidden states of every one of them [n, H])."""
        features = np.empty((len(tokens), self.spec.hidden_size), dtype=FLOAT)
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            past = self.kv.length
            logits, hidden = self.forward(chunk, np.arange(past, past + len(chunk)), causal(len(chunk)))
            features[start : start + len(chunk)] = hidden
            self.kv.keep(np.arange(len(chunk)))
        return logits[-1].copy(), features
