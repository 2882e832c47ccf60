"""The target graph on the CPU execution provider, its KV cache and its output buffers."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dovetail_onnx.runtime.buffers import FLOAT, PREFILL_CHUNK, SharedKVCache
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.kernels import rows_library
from dovetail_onnx.runtime.manifest import CHAINS_ON_ORT, CHAINS_UNCHECKED, GraphSpec
from dovetail_onnx.runtime.sessions import check_io, open_session, wants_cuda
from dovetail_onnx.runtime.tree import MASKED, causal

ROW_STEPS = (1, 2, 4)  # row multiples tried, fewest padding rows first
CHECKED_ROWS = 8  # chain forwards of 1..8 rows are checked against sequential decoding
log = logging.getLogger(__name__)


class Target:
    """One verify forward per call; the caller decides which new K/V rows to keep.

    The graph is onnxruntime-genai's fused one (export/target.py): attention takes the kept past
    from the shared KV buffers, explicit positions, and an additive bias over past + new rows.
    """

    def __init__(self, path: Path, spec: GraphSpec, threads: int | None, kernels: bool = True, device: str = "cpu",
                 role: str = "target"):
        """`path`: the graph on ORT's own kernels; `kernels`: run the manifest's `kernel_file` instead where
        dovetail's kernels build on this machine (runtime/kernels.py). `device`: where the session runs (a draft
        model may run on CUDA; its KV cache stays in host memory, bound by pointer)."""
        self.spec = spec
        graph, libraries = path, ()
        if kernels and spec.kernel_file and not wants_cuda(device):  # dovetail's kernels are CPU operators
            library, why = rows_library()
            if library:
                graph, libraries = path.with_name(spec.kernel_file), (library,)
            elif spec.precision == "gguf":  # MatMulNBits computes float zero points by dequantizing to fp32
                log.warning(f"the gguf target runs onnxruntime's MatMulNBits, not dovetail's row kernel ({why}); its "
                            "blocks with zero points (Q4_1, Q4_K) take MatMulNBits' fp32 path, ~20x slower: fix that, or "
                            "export --precision int4 for this machine")
            elif spec.precision == "fp32":
                log.warning(f"the target runs onnxruntime's MatMul and attention, not dovetail's kernels ({why}): "
                            "slower, most at long context")
            else:
                log.warning(f"the quantized target runs onnxruntime's MatMulNBits and attention, not dovetail's kernels "
                            f"({why}), so verify rows cost more")
        self.graph = graph
        self.kernels = bool(libraries)  # dovetail's kernels run it: every row computed alike, whatever runs with it
        # Draft shapes whose rows equal sequential decoding on the graph that runs: trees on dovetail's attention.
        self.verify = spec.kernel_verify or spec.verify if libraries else spec.verify
        self.chains_why = CHAINS_UNCHECKED if libraries and not spec.kernel_verify else CHAINS_ON_ORT
        self.session, self.device = open_session(graph, device, threads, role, libraries=libraries)
        names = SharedKVCache.graph_names(spec.num_layers)
        check_io(self.session, role,
                 {"input_ids": {}, "attention_mask": {}, "position_ids": {}, "attention_bias": {},
                  **({"attention_bias_local": {}} if spec.sliding_window else {}),
                  **{past: {1: spec.kv_heads, 3: spec.head_dim} for past, _ in names}},
                 {"logits": {-1: spec.vocab_size}, "hidden_states": {-1: spec.hidden_size},
                  **{present: {1: spec.kv_heads, 3: spec.head_dim} for _, present in names}})
        self.kv: SharedKVCache | None = None
        # Every forward runs a multiple of this many rows (padding rows come last): a quantized kernel may compute a
        # row differently by where it falls among the call's rows, and speculative output must stay target-only's.
        self.row_step = spec.min_rows
        if spec.precision != "fp32":
            self.row_step = self._exact_row_step()
            if self.row_step > spec.row_step:
                log.warning(f"this CPU's quantized kernels compute a row differently by how many rows run with it; "
                            f"every target forward runs a multiple of {self.row_step} rows (the exporting CPU: "
                            f"{spec.row_step}) so speculative output stays identical to target-only")

    def _exact_row_step(self) -> int:
        """The least row multiple at which every row of a chain forward equals sequential decoding bit for bit on
        this CPU. Kernels are chosen by CPU, and a quantized graph amplifies any 1e-7 difference (export/target.py):
        on an AVX-512 EPYC, int4 at block 32 runs any row count alike, while at block 128 an odd last row takes
        another path. 16 small forwards over an empty cache per multiple tried, once per session."""
        tokens = np.arange(1, CHECKED_ROWS + 1) % self.spec.vocab_size
        for step in (step for step in ROW_STEPS if step >= self.spec.min_rows):
            self.row_step = step
            if self._chains_exact(tokens):
                return step
        raise DovetailError("this CPU's quantized kernels compute a row differently by how many rows run with it, "
                            "so speculative output could differ from target-only; re-export with another "
                            "--block-size or --precision fp32")

    def _chains_exact(self, tokens: np.ndarray) -> bool:
        """Whether every row of a chain forward of 1..n `tokens` equals their sequential decoding bit for bit."""
        self.start(len(tokens), len(tokens))
        sequential = []
        for i in range(len(tokens)):
            sequential.append(self.forward(tokens[i : i + 1], np.array([i]), causal(1))[0][0].copy())
            self.kv.keep(np.arange(1))
        for rows in range(1, len(tokens) + 1):
            self.kv.length = 0
            logits = self.forward(tokens[:rows], np.arange(rows), causal(rows))[0]
            if not all(np.array_equal(logits[i], sequential[i]) for i in range(rows)):
                return False
        self.kv.length = 0
        return True

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
        # A padded forward (row_step, attention_rows) writes a few rows past the last position.
        self.kv.reserve(capacity + max(self.row_step, spec.attention_rows), keep)
        rows = self.padded(max(max_seq, PREFILL_CHUNK, spec.attention_rows))
        self.logits = np.zeros((rows, spec.vocab_size), dtype=FLOAT)
        self.hidden = np.zeros((rows, spec.hidden_size), dtype=FLOAT)
        self.ids = np.zeros(rows, dtype=np.int64)
        self.positions = np.zeros(rows, dtype=np.int64)
        self.ones = np.ones(self.kv.capacity, dtype=np.int64)
        self.bias = np.zeros(rows * self.kv.capacity, dtype=FLOAT)
        self.local = np.zeros(rows * self.kv.capacity, dtype=FLOAT) if spec.sliding_window else None
        # Python after a forward runs with caches the weights have flushed: every call costs ~10x its warm time
        # (measured: 0.5 ms between two 1-row forwards), so a step does as few as it can.
        self._ptr = {name: array.ctypes.data for name, array in (
            ("input_ids", self.ids), ("position_ids", self.positions), ("attention_mask", self.ones),
            ("attention_bias", self.bias), ("logits", self.logits), ("hidden_states", self.hidden),
            *([("attention_bias_local", self.local)] if self.local is not None else []))}
        self.binding = self.session.io_binding()
        self.kv.bind(self.binding)
        self._bound_rows = 0

    def forward(self, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                drafted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run `tokens` after the kept past; `mask` `[1, 1, S, S]` is additive among them (the past is visible, but
        for `drafted` `[S, D]`: an additive mask over the past's last D rows, a draft tree's earlier levels).
        Returns views (logits [S, V], hidden [S, H]) valid until the next call.

        Quantized graphs get padding rows: in their attention when S is 1 (`attention_rows` 2), and in the whole
        forward up to a multiple of `row_step`. They come last: no real row sees them.
        """
        seq, past, spec = len(tokens), self.kv.length, self.spec
        rows = self.padded(seq)
        attention_rows = max(rows, spec.attention_rows)
        total = past + attention_rows
        bias = self.bias[: attention_rows * total].reshape(attention_rows, total)
        bias[:, :past] = 0.0
        bias[:, past:] = MASKED
        if drafted is not None:
            bias[:seq, past - drafted.shape[1] : past] = drafted
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
        if self.local is not None:  # the same mask, less the keys a query sits `sliding_window` or more positions past
            keys = np.concatenate((np.arange(past), self.positions[:attention_rows]))
            local = self.local[: attention_rows * total].reshape(attention_rows, total)
            np.copyto(local, np.where(self.positions[:attention_rows, None] - keys < spec.sliding_window, bias, MASKED))
            b.bind_input("attention_bias_local", "cpu", 0, FLOAT, [1, 1, attention_rows, total],
                         ptr["attention_bias_local"])
        self.session.run_with_iobinding(b)
        return self.logits[:seq], self.hidden[:seq]

    def padded(self, rows: int) -> int:
        return -(-rows // self.row_step) * self.row_step

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
