"""The target graph on the CPU execution provider, its KV cache and its output buffers."""
from __future__ import annotations

import numpy as np

from dovetail_onnx.runtime.buffers import PREFILL_CHUNK, Buffer, KVCache
from dovetail_onnx.runtime.manifest import Manifest
from dovetail_onnx.runtime.sessions import check_io, open_session
from dovetail_onnx.runtime.tree import causal


class Target:
    """One verify forward per call; the caller decides which new K/V rows to keep."""

    def __init__(self, manifest: Manifest, threads: int | None):
        self.spec = manifest.target
        self.session, self.device = open_session(manifest.folder / self.spec.file, "cpu", threads, "target")
        check_io(self.session, self.spec, "target")
        self.kv: KVCache | None = None

    @property
    def cached(self) -> int:
        """Rows of the KV cache the last generation left: K/V of its first tokens."""
        return self.kv.length if self.kv else 0

    def start(self, capacity: int, max_seq: int, keep: int = 0) -> None:
        """Set up a generation: KV for `capacity` positions whose first `keep` rows stay, outputs for `max_seq` rows."""
        if self.kv is None:
            self.kv = KVCache(self.spec.num_layers, self.spec.kv_width, capacity, "cpu")
        self.kv.reserve(capacity, keep)
        self.rows = max(max_seq, PREFILL_CHUNK)
        self.logits = Buffer(self.rows, self.spec.vocab_size, "cpu")
        self.hidden = Buffer(self.rows, self.spec.hidden_size, "cpu")
        self.binding = self.session.io_binding()

    def forward(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run `tokens` after the kept past; returns views (logits [S, V], hidden [S, H]) valid until the next call."""
        seq = len(tokens)
        b = self.binding
        b.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64)[None])
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64)[None])
        b.bind_cpu_input("attention_mask", mask)
        self.kv.bind(b, self.kv.length, seq)
        self.logits.bind_output(b, "logits", 0, [1, seq, self.spec.vocab_size])
        self.hidden.bind_output(b, "hidden_states", 0, [1, seq, self.spec.hidden_size])
        self.session.run_with_iobinding(b)
        return self.logits.array[:seq], self.hidden.array[:seq]

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Process `tokens` after the kept past; returns (last logits [V], hidden states of every one of them [n, H])."""
        features = np.empty((len(tokens), self.spec.hidden_size), dtype=np.float32)
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            past = self.kv.length
            logits, hidden = self.forward(chunk, np.arange(past, past + len(chunk)), causal(len(chunk)))
            features[start : start + len(chunk)] = hidden
            self.kv.keep(np.arange(len(chunk)))
        return logits[-1].copy(), features
