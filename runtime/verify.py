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
