"""Greedy verification: which drafted tokens the target would have produced itself."""
from __future__ import annotations

import numpy as np

from dovetail_onnx.runtime.tree import Tree


def accept_greedy(tree: Tree, predicted: np.ndarray) -> tuple[list[int], int]:
    """Longest root path whose every token is the target's argmax after its parent.

    `predicted[i]` is the target's greedy token after node i. Returns (path node indices, bonus
    token): the path starts at the root, and the bonus is the target's token after its last node.
    """
    path = [0]
    while True:
        node = path[-1]
        match = [c for c in tree.children(node) if tree.tokens[c] == predicted[node]]
        if not match:
            return path, int(predicted[node])
        path.append(int(match[0]))


def accept_sampled(tree: Tree, probs: np.ndarray, rng: np.random.Generator) -> tuple[list[int], int]:
    """Lossless acceptance when sampling: the emitted tokens follow the target's distribution exactly.

    The tree's children are fixed proposals (EAGLE-2's top-k), so each is a point-mass draft: child
    x is accepted with probability p(x); on rejection x is removed from p and p renormalized, and
    the next sibling is tried. If none is accepted, the bonus token is drawn from what is left.
    `probs[i]` is the target's sampling distribution after node i.
    """
    path = [0]
    while True:
        node = path[-1]
        p = probs[node].copy()
        for child in tree.children(node):
            token = tree.tokens[child]
            if rng.random() < p[token]:
                path.append(int(child))
                break
            p[token] = 0.0
            p /= p.sum()
        else:
            return path, int(rng.choice(len(p), p=p))
