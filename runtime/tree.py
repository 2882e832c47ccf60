"""A draft token tree: node 0 is the root (the last accepted token), parents come before children."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MASKED = np.finfo(np.float32).min


def additive(visible: np.ndarray) -> np.ndarray:
    """Boolean visibility → the additive float mask the graphs take."""
    return np.where(visible, np.float32(0.0), MASKED).astype(np.float32)


def causal(seq: int) -> np.ndarray:
    return additive(np.tril(np.ones((seq, seq), dtype=bool)))[None, None]


@dataclass
class Tree:
    tokens: np.ndarray  # [N] int64
    parents: np.ndarray  # [N] int64, parents[0] == -1, parents[i] < i
    ancestors: np.ndarray = field(init=False)  # [N, N] bool: node i sees node j (j on i's root path)
    depth: np.ndarray = field(init=False)  # [N] root depth 0

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if self.parents[0] != -1 or np.any(self.parents[1:] >= np.arange(1, n)) or np.any(self.parents[1:] < 0):
            raise ValueError("tree parents must precede their children and node 0 must be the root")
        self.ancestors = np.eye(n, dtype=bool)
        for i in range(1, n):
            self.ancestors[i] |= self.ancestors[self.parents[i]]
        self.depth = self.ancestors.sum(axis=1) - 1

    def __len__(self) -> int:
        return len(self.tokens)

    def mask(self) -> np.ndarray:
        """`[1, 1, N, N]` additive mask: each node sees its ancestors and itself."""
        return additive(self.ancestors)[None, None]

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path as node indices."""
        leaves = np.setdiff1d(np.arange(len(self)), self.parents[1:])
        return [list(np.flatnonzero(self.ancestors[leaf])) for leaf in leaves]

    def children(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.parents == node)

    def graft(self, chain: np.ndarray) -> tuple[Tree, int]:
        """This tree with `chain` hung under the root: where the chain's tokens are already a path it follows
        that path, the rest is appended. Returns the tree (itself when nothing is new) and its first appended node."""
        node = 0
        for i, token in enumerate(chain):
            match = [c for c in self.children(node) if self.tokens[c] == token]
            if not match:
                parents = [node, *range(len(self), len(self) + len(chain) - i - 1)]
                return Tree(np.concatenate((self.tokens, chain[i:])), np.concatenate((self.parents, parents))), len(self)
            node = int(match[0])
        return self, len(self)
