"""Prompt lookup and grafting its chain into a draft tree."""
from __future__ import annotations

import numpy as np

from dovetail_onnx.runtime.drafter import best_tree
from dovetail_onnx.runtime.lookup import lookup
from dovetail_onnx.runtime.tree import Tree


def test_lookup_copies_what_followed_the_latest_longest_match():
    history = np.array([7, 1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 2, 3])
    np.testing.assert_array_equal(lookup(history, 3), [4, 5, 6])  # "2 3" last seen before 4, not before 9
    np.testing.assert_array_equal(lookup(np.array([5, 1, 2, 8, 9, 2]), 4), [8, 9, 2])  # a 1-token match
    assert len(lookup(np.array([1, 2, 3]), 4)) == 0 and len(lookup(np.array([4]), 4)) == 0


def test_graft_follows_shared_paths_and_appends_the_rest():
    tree = Tree(np.array([5, 1, 2, 3]), np.array([-1, 0, 0, 1]))
    grafted, first = tree.graft(np.array([1, 3, 7, 8]))
    np.testing.assert_array_equal(grafted.tokens, [5, 1, 2, 3, 7, 8])
    np.testing.assert_array_equal(grafted.parents, [-1, 0, 0, 1, 3, 4])
    assert first == 4
    assert grafted.paths()[-1] == [0, 1, 3, 4, 5]
    grafted, _ = tree.graft(np.array([9]))
    np.testing.assert_array_equal(grafted.parents, [-1, 0, 0, 1, 0])


def test_a_chain_the_drafter_already_holds_costs_no_places():
    """Candidates: 1 (−0.1), 2 (−0.5) under the root, 3 (−0.2) under 1, 4 (−2.0) under 3, 6 (−0.9) under 2."""
    tokens, parents = np.array([1, 2, 3, 4, 6]), np.array([-1, -1, 0, 2, 1])
    scores = np.array([-0.1, -0.5, -0.2, -2.0, -0.9])
    tree = best_tree(5, tokens, parents, scores, 6, np.array([1, 3, 4]))  # all held: the 5 best, 4 kept by force
    np.testing.assert_array_equal(tree.tokens, [5, 1, 2, 3, 4, 6])
    tree = best_tree(5, tokens, parents, scores, 5, np.array([1, 3, 4]))
    np.testing.assert_array_equal(tree.tokens, [5, 1, 2, 3, 4])  # 4 outranks the better 6: it is the chain's
    tree = best_tree(5, tokens, parents, scores, 5, np.array([1, 7, 8]))  # 7, 8 are new: two places kept free
    np.testing.assert_array_equal(tree.tokens, [5, 1, 3])
    grafted, first = tree.graft(np.array([1, 7, 8]))
    assert len(grafted) == 5 and first == 3
    np.testing.assert_array_equal(grafted.parents, [-1, 0, 1, 1, 3])
