"""Sampling settings and the target's sampling distribution (temperature, top-k, top-p)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dovetail_onnx.runtime.errors import DovetailError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None

    def check(self, vocab_size: int | None = None) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise DovetailError(f"--temperature must be a finite number ≥ 0 (0 = greedy), got {self.temperature}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise DovetailError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and 0 <= self.top_k <= (vocab_size or self.top_k)):
            limit = f" and at most the vocabulary size {vocab_size}" if vocab_size else ""
            raise DovetailError(f"--sample-top-k must be ≥ 0 (0 = no limit){limit}, got {self.top_k}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise DovetailError(f"--seed must be an integer from 0 to 2**64 - 1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Rows of `logits` [N, V] → the distributions the target samples from, float64."""
        scaled = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = -np.partition(-scaled, min(self.top_k, scaled.shape[-1]) - 1, axis=-1)[:, self.top_k - 1 : self.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        p = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(p, order, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = np.cumsum(sorted_p, axis=-1) - sorted_p >= self.top_p
            np.put_along_axis(p, order, np.where(drop, 0.0, sorted_p), axis=-1)
            p /= p.sum(axis=-1, keepdims=True)
        return p
