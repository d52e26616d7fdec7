"""Draft tree structure: depths, ancestor mask, children, EAGLE-2 node selection."""

import pytest
import torch

from msd.decoding.tree import DraftTree, TreeParams, select_nodes


def example_tree() -> DraftTree:
    # 0 -> 1 -> 3 -> 5
    #   -> 2 -> 4
    return DraftTree(tokens=torch.tensor([10, 11, 12, 13, 14, 15]), parents=torch.tensor([-1, 0, 0, 1, 2, 3]))


def test_tree_depths():
    assert example_tree().depths.tolist() == [0, 1, 1, 2, 2, 3]


def test_ancestor_mask_rows():
    mask = example_tree().ancestor_mask()
    # Each row contains the node itself and its ancestors, nothing else.
    assert mask[0].nonzero().view(-1).tolist() == [0]
    assert mask[3].nonzero().view(-1).tolist() == [0, 1, 3]
    assert mask[4].nonzero().view(-1).tolist() == [0, 2, 4]
    assert mask[5].nonzero().view(-1).tolist() == [0, 1, 3, 5]


def test_children_and_path():
    tree = example_tree()
    assert tree.children()[0] == {11: 1, 12: 2}
    assert tree.children()[5] == {}
    assert tree.path_to(5) == [0, 1, 3, 5]


def test_chain_tree():
    tree = DraftTree.chain([7, 8, 9])
    assert tree.parents.tolist() == [-1, 0, 1]
    assert torch.equal(tree.ancestor_mask(), torch.tril(torch.ones(3, 3, dtype=torch.bool)))


def test_parent_after_child_rejected():
    with pytest.raises(ValueError, match="parents must come before"):
        DraftTree(tokens=torch.tensor([1, 2, 3]), parents=torch.tensor([-1, 2, 0]))


def test_tree_params_validation():
    with pytest.raises(ValueError, match="depth"):
        TreeParams(depth=0)


def test_select_nodes_keeps_best_and_ancestors():
    # Candidates parents-first: 0 and 1 are root children; 2, 3 children of 0; 4 child of 1.
    scores = torch.tensor([-0.1, -2.0, -0.3, -0.2, -2.1])
    parents = torch.tensor([-1, -1, 0, 0, 1])
    assert select_nodes(scores, parents, 3).tolist() == [0, 2, 3]
    assert select_nodes(scores, parents, 10).tolist() == [0, 1, 2, 3, 4]


def test_select_nodes_ties_prefer_parent():
    # A child with log-probability 0 ties its parent; the budget of one must pick the parent.
    scores = torch.tensor([-1.0, -1.0])
    parents = torch.tensor([-1, 0])
    assert select_nodes(scores, parents, 1).tolist() == [0]


def test_tree_params_parse():
    # "depth,top_k,total_tokens" as the benchmark scripts take it; malformed text names the expected form
    assert TreeParams.parse("3,1,4") == TreeParams(depth=3, top_k=1, total_tokens=4)
    for text in ("3,1", "3,x,4", "3,1,4,5", ""):
        with pytest.raises(ValueError, match="expected depth,top_k,total_tokens"):
            TreeParams.parse(text)
    with pytest.raises(ValueError, match="tree depth must be at least 1, got 0"):
        TreeParams.parse("0,1,4")


def test_tree_params_capped():
    # Only total_tokens above the cap changes, and no cap leaves the parameters as they are.
    tree = TreeParams(depth=5, top_k=8, total_tokens=48)
    assert tree.capped(16) == TreeParams(depth=5, top_k=8, total_tokens=12)  # 4 tokens left for the lookup
    assert tree.capped(64) is tree
    assert tree.capped(None) is tree
