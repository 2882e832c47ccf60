"""Prompt lookup, and its chain competing with the drafter for the tree's places."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from dovetail_onnx.runtime.drafter import best_tree
from dovetail_onnx.runtime.lookup import Copier, lookup
from dovetail_onnx.runtime.manifest import TreeSettings
from dovetail_onnx.runtime.tree import Tree

FIVE = TreeSettings(total_tokens=5)


def test_lookup_copies_what_followed_the_latest_longest_match():
    history = np.array([7, 1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 2, 3])
    chain, match = lookup(history, 3)
    np.testing.assert_array_equal(chain, [4, 5, 6])  # "2 3" last seen before 4, not before 9
    assert match == 2
    chain, match = lookup(np.array([5, 1, 2, 8, 9, 2]), 4)
    np.testing.assert_array_equal(chain, [8, 9, 2])
    assert match == 1
    assert len(lookup(np.array([1, 2, 3]), 4)[0]) == 0 and len(lookup(np.array([4]), 4)[0]) == 0


def test_copy_odds_favour_longer_matches_fall_along_the_chain_and_follow_the_outcome():
    copier = Copier(3)
    long_chain, long_odds = copier.propose(np.array([7, 1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3]))
    _, short_odds = copier.propose(np.array([5, 1, 2, 8, 9, 2]))
    assert len(long_odds) == len(short_odds) == 3 and (np.diff(long_odds) < 0).all() and (long_odds < 0).all()
    assert (long_odds > short_odds).all()
    history = np.array([5, 1, 2, 8, 9, 2])
    for _ in range(10):  # 1-token matches keep being right here
        chain, _ = copier.propose(history)
        copier.update(chain)
    _, before = copier.propose(history)
    assert (before > short_odds).all()
    copier.update(np.array([0, 0, 0]))  # a miss on the first copied token lowers only that token's odds
    _, after = copier.propose(history)
    assert after[0] < before[0] and np.isclose(after[1] - after[0], before[1] - before[0])
    assert len(Copier(0).propose(history)[1]) == 0


def test_graft_follows_shared_paths_and_appends_the_rest():
    tree = Tree(np.array([5, 1, 2, 3]), np.array([-1, 0, 0, 1]))
    grafted, first = tree.graft(np.array([1, 3, 7, 8]))
    np.testing.assert_array_equal(grafted.tokens, [5, 1, 2, 3, 7, 8])
    np.testing.assert_array_equal(grafted.parents, [-1, 0, 0, 1, 3, 4])
    assert first == 4
    assert grafted.paths()[-1] == [0, 1, 3, 4, 5]
    grafted, _ = tree.graft(np.array([9]))
    np.testing.assert_array_equal(grafted.parents, [-1, 0, 0, 1, 0])


def test_the_chain_competes_for_places_by_score():
    """Candidates: 1 (−0.1), 2 (−0.5) under the root, 3 (−0.2) under 1, 4 (−2.0) under 3, 6 (−0.9) under 2."""
    tokens, parents = np.array([1, 2, 3, 4, 6]), np.array([-1, -1, 0, 2, 1])
    scores = np.array([-0.1, -0.5, -0.2, -2.0, -0.9])
    tree, first = best_tree(5, tokens, parents, scores, FIVE)
    np.testing.assert_array_equal(tree.tokens, [5, 1, 2, 3, 6])
    assert first == 5  # nothing copied
    # The chain 1 3 4 is held by the candidates: 4 takes the chain's better score and outranks 6.
    tree, first = best_tree(5, tokens, parents, scores, FIVE, (np.array([1, 3, 4]), np.array([-0.05, -0.3, -0.4])))
    np.testing.assert_array_equal(tree.tokens, [5, 1, 2, 3, 4])
    assert first == 5
    # 1 is held, 7 8 are new below it: 7 (−0.3) outranks 2 and 6, 8 (−1.5) misses the cut: only 7 is copied.
    tree, first = best_tree(5, tokens, parents, scores, FIVE, (np.array([1, 7, 8]), np.array([-0.1, -0.3, -1.5])))
    np.testing.assert_array_equal(tree.tokens, [5, 1, 2, 3, 7])
    np.testing.assert_array_equal(tree.parents, [-1, 0, 0, 1, 1])
    assert first == 4
    # A chain whose odds are poor takes no place at all.
    tree, first = best_tree(5, tokens, parents, scores, FIVE, (np.array([9, 8]), np.array([-3.0, -4.0])))
    np.testing.assert_array_equal(tree.tokens, [5, 1, 2, 3, 6])
    assert first == 5


def test_best_nodes_always_include_their_parents():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        parents = np.array([int(rng.integers(-1, i)) for i in range(n)])
        steps = np.log(rng.uniform(0.05, 1.0, n))
        scores = np.zeros(n)
        for i in range(n):
            scores[i] = steps[i] + (scores[parents[i]] if parents[i] >= 0 else 0.0)
        tokens = rng.integers(0, 5, n)
        chain = rng.integers(0, 5, int(rng.integers(0, 6)))
        copied = (chain, np.log(rng.uniform(0.05, 1.0, len(chain))).cumsum())
        total = int(rng.integers(2, 20))
        # Tree checks that parents precede children.
        tree, first = best_tree(9, tokens, parents, scores, TreeSettings(total_tokens=total), copied)
        assert len(tree) <= total and 1 <= first <= len(tree)


def test_cost_sizing_takes_the_size_with_the_most_expected_tokens_per_ms():
    """A staircase like the AVX2 SGEMM's (6 rows cost less than 5): sure candidates fill 6 rows, doubtful ones
    none, and without a measured cost the tree is always full."""
    stairs = TreeSettings(total_tokens=6, step_ms=(10.0, 13.0, 13.0, 13.0, 16.0, 15.0))
    sure, doubtful = np.log(np.full(9, 0.9)), np.log(np.full(9, 0.05))
    assert stairs.sized(sure) == 6 and stairs.sized(doubtful) == 1
    assert stairs.sized(np.log([0.9, 0.8, 0.3, 0.02, 0.01])) == 4  # 2.0 + 0.03 more tokens do not pay 3 ms more
    assert TreeSettings(total_tokens=6).sized(doubtful) == 6 and TreeSettings(total_tokens=6).sized(sure[:2]) == 3
    tokens, parents = np.array([1, 2, 3, 4, 6]), np.array([-1, -1, 0, 2, 1])
    tree, _ = best_tree(5, tokens, parents, np.log([0.9, 0.02, 0.8, 0.7, 0.01]), replace(stairs, total_tokens=5))
    np.testing.assert_array_equal(tree.tokens, [5, 1, 3, 4])
