"""Prompt lookup: drafts copied from the text so far, at no drafter forward.

Summaries, answers about a document and code edits repeat their input. The last few tokens are
searched for earlier in the prompt and the generated text; what followed their latest earlier
occurrence is proposed as a chain (the longest suffix that matches wins).
"""
from __future__ import annotations

import numpy as np

MAX_NGRAM = 3


def lookup(history: np.ndarray, length: int, max_ngram: int = MAX_NGRAM) -> np.ndarray:
    """Up to `length` tokens that followed the latest earlier occurrence of the longest suffix (≤ `max_ngram`)."""
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
        starts = np.flatnonzero((windows == history[-n:]).all(axis=1))
        if len(starts):
            follow = starts[-1] + n
            return history[follow : follow + length]
    return history[:0]
