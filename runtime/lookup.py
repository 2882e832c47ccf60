"""Prompt lookup: drafts copied from the text so far, at no drafter forward.

Summaries, answers about a document and code edits repeat their input. The last few tokens are
searched for earlier in the prompt and the generated text; what followed their latest earlier
occurrence is proposed as a chain (the longest suffix that matches wins). Each copied token carries
the log-probability that it and those before it are all the target's next tokens, on the same scale
as the drafter's candidates, so the copy takes places in the tree only where it is the better bet.
How often copies are right depends on the task (code repeats itself far more than chat), so the odds
start from measured ones and follow what the target accepts during the generation.
"""
from __future__ import annotations

import numpy as np

MAX_NGRAM = 3
# P(a copied token is the target's next one | the copied ones before it were), by the length of the suffix that
# matched: (first copied token, each later one). Measured on SmolLM2-135M-Instruct's greedy answers to 856 training
# prompts (its drafter's data; docs/design.md, "Prompt lookup"); a longer match is a far better bet.
PRIOR = {1: (0.11, 0.55), 2: (0.36, 0.65), 3: (0.65, 0.85)}
PRIOR_WEIGHT = 4.0  # the prior counts as this many copies seen


def lookup(history: np.ndarray, length: int, max_ngram: int = MAX_NGRAM) -> tuple[np.ndarray, int]:
    """Up to `length` tokens that followed the latest earlier occurrence of the longest suffix (≤ `max_ngram`),
    and the length of that suffix (0: no match)."""
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
        starts = np.flatnonzero((windows == history[-n:]).all(axis=1))
        if len(starts):
            follow = starts[-1] + n
            return history[follow : follow + length], n
    return history[:0], 0


class Copier:
    """Prompt lookup for one generation: proposes chains with their odds, and learns the odds from the outcome."""

    def __init__(self, length: int):
        self.length = length
        self.seen = np.array([[PRIOR_WEIGHT, PRIOR_WEIGHT] for _ in PRIOR])  # [match - 1, first | later]
        self.right = np.array([[PRIOR_WEIGHT * p for p in PRIOR[n]] for n in sorted(PRIOR)])
        self.last: tuple[np.ndarray, int] | None = None

    def propose(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A chain and each token's cumulative log-probability that it and all before it are the target's."""
        chain, match = lookup(history, self.length)
        self.last = (chain, match) if len(chain) else None
        if not len(chain):
            return chain, np.zeros(0)
        first, later = self.right[match - 1] / self.seen[match - 1]
        return chain, np.log(np.where(np.arange(len(chain)) == 0, first, later)).cumsum()

    def update(self, emitted: np.ndarray) -> None:
        """Count the last chain's tokens against the target's own next tokens, up to the first miss."""
        if self.last is None:
            return
        chain, match = self.last
        for j in range(min(len(chain), len(emitted))):
            later = int(j > 0)
            self.seen[match - 1, later] += 1
            if chain[j] != emitted[j]:
                break
            self.right[match - 1, later] += 1
        self.last = None
