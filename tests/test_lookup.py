"""N-gram lookup: the index of earlier n-grams, grafting a chain onto a draft tree, and exact output with grafts."""

import pytest
import torch

from msd.decoding import MSDDrafter, SpeculativeGenerator, TreeParams
from msd.decoding.lookup import NgramIndex
from msd.decoding.tree import DraftTree, graft_chain
from msd.draft import DraftConfig, DraftModel
from tiny_models import CORPUS, random_image


def index_of(tokens, max_ngram=3):
    index = NgramIndex(max_ngram)
    index.extend(tokens)
    return index


def test_repeated_phrase_continues():
    # The sequence ends with "1 2", which was followed by "3 4" before.
    assert index_of([1, 2, 3, 4, 9, 1, 2]).continuation(2) == [3, 4]


def test_longest_ngram_wins():
    # "7" alone last occurred before 8, but the 2-gram "6 7" occurred before 5.
    assert index_of([6, 7, 5, 0, 7, 8, 6, 7]).continuation(1) == [5]


def test_latest_occurrence_wins():
    assert index_of([1, 2, 1, 3, 1]).continuation(1) == [3]


def test_no_earlier_occurrence():
    # The final token never occurred before it, and an empty sequence has nothing to continue.
    assert index_of([1, 2, 3]).continuation(4) == []
    assert NgramIndex().continuation(4) == []


def test_repeating_pattern_continues():
    # The last occurrence of "5 5 5" overlaps the end, so the copy reads on from its own output.
    assert index_of([5, 5, 5, 5]).continuation(4) == [5, 5, 5, 5]
    assert index_of([1, 2, 1, 2]).continuation(3) == [1, 2, 1]


def test_continuation_grows_with_tokens():
    # Tokens appended later are indexed: the final 4 now continues as it did after the first 4.
    index = index_of([4, 5])
    index.extend([6, 4])
    assert index.continuation(2) == [5, 6]


def test_max_ngram_must_be_positive():
    with pytest.raises(ValueError, match="max_ngram"):
        NgramIndex(0)


def example_tree() -> DraftTree:
    # 0 -> 1 (11) -> 3 (13)
    #   -> 2 (12)
    return DraftTree(tokens=torch.tensor([10, 11, 12, 13]), parents=torch.tensor([-1, 0, 0, 1]))


def test_graft_follows_then_branches():
    # 11 and 13 are nodes 1 and 3, so 20 and 21 become a path below node 3.
    tree = graft_chain(example_tree(), [11, 13, 20, 21], budget=4, max_depth=8)
    assert tree.tokens.tolist() == [10, 11, 12, 13, 20, 21]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 3, 4]
    assert tree.depths.tolist() == [0, 1, 1, 2, 3, 4]


def test_graft_at_root():
    tree = graft_chain(example_tree(), [30, 31], budget=4, max_depth=8)
    assert tree.parents.tolist()[4:] == [0, 4]


def test_graft_respects_budget_and_depth():
    assert len(graft_chain(example_tree(), [30, 31, 32], budget=1, max_depth=8)) == 5
    # Below node 3 (depth 2) only one more level fits in a depth of 3.
    assert len(graft_chain(example_tree(), [11, 13, 20, 21], budget=4, max_depth=3)) == 5


def test_graft_adds_nothing():
    # A chain that the tree already contains, or no chain at all, leaves the tree as it is.
    tree = example_tree()
    assert graft_chain(tree, [11, 13], budget=4, max_depth=8) is tree
    assert graft_chain(tree, [], budget=4, max_depth=8) is tree
    assert graft_chain(tree, [30], budget=0, max_depth=8) is tree


def test_lookup_tokens_validation():
    assert TreeParams().lookup_tokens == 4
    with pytest.raises(ValueError, match="lookup_tokens"):
        TreeParams(lookup_tokens=-1)


def grafting_generator(family, lookup_tokens=4):
    """A random draft, whose own candidates are rarely right, so accepted tokens come mostly from the lookup."""
    torch.manual_seed(3)
    draft = DraftModel(DraftConfig.for_target(family.target))
    tree = TreeParams(depth=2, top_k=2, total_tokens=4, lookup_tokens=lookup_tokens)
    return SpeculativeGenerator(family.target, draft, tree)


def test_grafts_keep_greedy_output(family):
    # Tiny random models repeat themselves, so the lookup grafts often. The output must stay generate's.
    inputs = family.make_inputs(" ".join(CORPUS[:2]), [random_image(80, 60, 1)])
    expected = family.reference(inputs, 40, eos_token_id=-1)
    generator = grafting_generator(family)
    output = generator.generate(inputs, max_new_tokens=40, eos_token_ids=[])
    assert output.token_ids == expected
    assert generator.drafter.grafts > 0  # the check covered trees with grafted tokens


def test_lookup_raises_tau(llava_family):
    # On a repetitive output, grafted tokens are accepted: tau rises above the same drafter's without the lookup.
    inputs = llava_family.make_inputs(" ".join(CORPUS[:2]), [])
    with_lookup = grafting_generator(llava_family).generate(inputs, max_new_tokens=40, eos_token_ids=[])
    without = grafting_generator(llava_family, lookup_tokens=0).generate(inputs, max_new_tokens=40, eos_token_ids=[])
    assert with_lookup.token_ids == without.token_ids
    assert with_lookup.stats.tau > without.stats.tau


class SizeRecorder(MSDDrafter):
    """Records the size of every proposed tree."""

    sizes: list[int] = []

    def propose(self, root_token, params, max_depth):
        tree = super().propose(root_token, params, max_depth)
        self.sizes.append(len(tree))
        return tree


def test_grafts_fit_verification_limit(llava_family, monkeypatch):
    # A target that verifies at most 6 tokens exactly never gets a larger tree, lookup included.
    target = llava_family.target
    monkeypatch.setattr(target, "max_tree_tokens", 6)
    torch.manual_seed(3)
    drafter = SizeRecorder(DraftModel(DraftConfig.for_target(target)), target)
    drafter.sizes = []
    generator = SpeculativeGenerator(target, drafter, TreeParams(depth=2, top_k=2, total_tokens=4, lookup_tokens=4))
    generator.generate(llava_family.make_inputs(" ".join(CORPUS[:2]), []), max_new_tokens=30, eos_token_ids=[])
    assert drafter.grafts > 0
    assert max(drafter.sizes) <= 6


class FixedTreeDrafter(MSDDrafter):
    """Proposes a fixed draft tree, root 7 -> 8 -> 9, so the lookup's graft is the only variable."""

    def _draft_tree(self, root_token, params, max_depth):
        return DraftTree(tokens=torch.tensor([root_token, 8, 9]), parents=torch.tensor([-1, 0, 1]))


def fixed_tree_drafter(target, history):
    drafter = FixedTreeDrafter(DraftModel(DraftConfig.for_target(target)), target)
    drafter.ngrams.extend(history)
    return drafter


def test_graft_below_draft_path(llava_family):
    # The lookup continues 7 with 8 9 10 11 12 13: the chain follows the draft's path 8 9, then grafts 4 more tokens.
    drafter = fixed_tree_drafter(llava_family.target, [7, 8, 9, 10, 11, 12, 13, 7])
    tree = drafter.propose(7, TreeParams(depth=2, top_k=1, total_tokens=3, lookup_tokens=4), max_depth=50)
    assert tree.tokens.tolist() == [7, 8, 9, 10, 11, 12, 13]
    assert tree.parents.tolist()[3:] == [2, 3, 4, 5]


def test_graft_stops_at_context(llava_family):
    # With room for 3 tokens after the root, the graft below depth 2 gets one token.
    drafter = fixed_tree_drafter(llava_family.target, [7, 8, 9, 10, 11, 12, 13, 7])
    tree = drafter.propose(7, TreeParams(depth=2, top_k=1, total_tokens=3, lookup_tokens=4), max_depth=3)
    assert tree.tokens.tolist() == [7, 8, 9, 10]
    assert int(tree.depths.max()) == 3
