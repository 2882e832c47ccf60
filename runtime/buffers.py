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
        self.past_names, self.new_names = self.names(layers, "past"), self.names(layers, "new")
        self.buffers = [Buffer(capacity, width, device) for _ in self.past_names]
        self.capacity, self.length = capacity, 0

    def reserve(self, capacity: int, keep: int) -> None:
        """Keep rows [0, keep) as the past and make room for `capacity` rows, growing the buffers only if needed."""
        if capacity > self.capacity:
            self.buffers = [buf.grown(capacity, keep) for buf in self.buffers]
            self.capacity = capacity
        self.length = keep

    @staticmethod
    def names(layers: int, prefix: str) -> list[str]:
        """The graph's KV tensor names: `past_key.0, past_value.0, …` (or `new_…`)."""
        return [f"{prefix}_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]

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


class SharedKVCache:
    """Per-layer K and V `[1, kv_heads, capacity, head_dim]` (the fused target's layout), each bound as both
    the graph's past and its present: GroupQueryAttention reads rows `[0, length)` and writes the new rows
    right after them in place. Shapes never change, so binding happens once per generation."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int):
        self.names = self.graph_names(layers)
        self.buffers = [np.zeros((1, kv_heads, capacity, head_dim), dtype=FLOAT) for _ in self.names]
        self.capacity, self.length = capacity, 0

    @staticmethod
    def graph_names(layers: int) -> list[tuple[str, str]]:
        """(past input, present output) of each K and V, as onnxruntime-genai's builder names them."""
        return [(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}") for i in range(layers) for kind in ("key", "value")]

    def reserve(self, capacity: int, keep: int) -> None:
        """Keep rows [0, keep) as the past and make room for `capacity` rows, growing the buffers only if needed."""
        if capacity > self.capacity:
            grown = []
            for buf in self.buffers:
                new = np.zeros((*buf.shape[:2], capacity, buf.shape[3]), dtype=FLOAT)
                new[:, :, :keep] = buf[:, :, :keep]
                grown.append(new)
            self.buffers, self.capacity = grown, capacity
        self.length = keep

    def bind(self, binding: ort.IOBinding) -> None:
        for (past, present), buf in zip(self.names, self.buffers):
            binding.bind_input(past, "cpu", 0, FLOAT, list(buf.shape), buf.ctypes.data)
            binding.bind_output(present, "cpu", 0, FLOAT, list(buf.shape), buf.ctypes.data)

    def keep(self, rows: np.ndarray) -> None:
        """Keep the new rows `length + rows` (a root-to-node path), packed at `length` onwards."""
        start = self.length
        # A root path rises from 0, so it is already in place exactly when it ends at len - 1.
        if rows[-1] != len(rows) - 1:
            for buf in self.buffers:
                buf[:, :, start : start + len(rows)] = buf[:, :, start + rows]
        self.length = start + len(rows)
