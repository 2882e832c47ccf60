"""Memory on a session's device, bound to ONNX Runtime by pointer.

Binding by pointer lets a graph read a prefix of a buffer (the valid past) and write its new rows
right after it, so no K/V row is copied between steps. KV caches outlive a generation, so the next
one can start from the rows it shares with the last (a conversation's earlier turns).
"""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort

FLOAT = np.dtype(np.float32)
# Long inputs (prompts) run in chunks of this many rows, so output buffers stay small (rows × vocab).
PREFILL_CHUNK = 128


class Buffer:
    """A row-major `[rows, width]` array on 'cpu' (numpy) or 'cuda' (an OrtValue)."""

    def __init__(self, rows: int, width: int, device: str, dtype: np.dtype = FLOAT):
        self.rows, self.width, self.device, self.dtype = rows, width, device, np.dtype(dtype)
        if device == "cpu":
            self.array = np.zeros((rows, width), dtype=self.dtype)
            self.ptr = self.array.ctypes.data
        else:
            self.value = ort.OrtValue.ortvalue_from_shape_and_type((rows, width), self.dtype, device, 0)
            self.ptr = self.value.data_ptr()

    def grown(self, rows: int, keep: int) -> Buffer:
        """A buffer of `rows` rows on the same device that starts with this one's first `keep` rows."""
        new = Buffer(rows, self.width, self.device, self.dtype)
        if keep and self.device == "cpu":
            new.array[:keep] = self.array[:keep]
        elif keep:
            host = np.zeros((rows, self.width), dtype=self.dtype)
            host[:keep] = self.value.numpy()[:keep]
            new.value.update_inplace(host)
        return new

    def bind_input(self, binding: ort.IOBinding, name: str, start: int, shape: list[int]) -> None:
        binding.bind_input(name, self.device, 0, self.dtype, shape, self._at(start, shape))

    def bind_output(self, binding: ort.IOBinding, name: str, start: int, shape: list[int]) -> None:
        binding.bind_output(name, self.device, 0, self.dtype, shape, self._at(start, shape))

    def _at(self, start: int, shape: list[int]) -> int:
        if start * self.width + math.prod(shape) > self.rows * self.width:
            raise RuntimeError(f"buffer overflow: rows {start}+{shape} past {self.rows}")
        return self.ptr + start * self.width * self.dtype.itemsize


class KVCache:
    """Per-layer K and V buffers `[capacity, kv_width]`; rows `[0, length)` hold the kept past."""

    def __init__(self, layers: int, width: int, capacity: int, device: str):
        self.width = width
        self.past_names = [f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
        self.new_names = [f"new_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
        self.buffers = [Buffer(capacity, width, device) for _ in self.past_names]
        self.capacity, self.length = capacity, 0

    def reserve(self, capacity: int, keep: int) -> None:
        """Keep rows [0, keep) as the past and make room for `capacity` rows, growing the buffers only if needed."""
        if capacity > self.capacity:
            self.buffers = [buf.grown(capacity, keep) for buf in self.buffers]
            self.capacity = capacity
        self.length = keep

    def bind(self, binding: ort.IOBinding, past: int, seq: int) -> None:
        """Past = rows [0, past); the graph writes its `seq` new rows at [past, past + seq)."""
        for past_name, new_name, buf in zip(self.past_names, self.new_names, self.buffers):
            buf.bind_input(binding, past_name, 0, [1, past, self.width])
            buf.bind_output(binding, new_name, past, [1, seq, self.width])

    def keep(self, rows: np.ndarray) -> None:
        """Keep the new rows `length + rows` (a root-to-node path), packed at `length` onwards."""
        start = self.length
        if not np.array_equal(rows, np.arange(len(rows))):
            for buf in self.buffers:
                buf.array[start : start + len(rows)] = buf.array[start + rows]
        self.length = start + len(rows)
