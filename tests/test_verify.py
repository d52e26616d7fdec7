"""Tree walking: greedy acceptance and the exactness of sampled acceptance on synthetic logits."""

import pytest
import torch
from scipy.stats import chisquare

from msd.decoding.tree import DraftTree
from msd.decoding.verify import SamplingParams, TokenChooser, greedy_choice, walk_tree

VOCAB = 6


def branching_tree() -> DraftTree:
    # root(0) -> token 1 (node 1) -> token 3 (node 3)
    #         -> token 2 (node 2)
    return DraftTree(tokens=torch.tensor([0, 1, 2, 3]), parents=torch.tensor([-1, 0, 0, 1]))


def test_greedy_walk_accepts_matching_path():
    logits = torch.full((4, VOCAB), -5.0)
    logits[0, 1] = 5  # root -> 1: accepted
    logits[1, 3] = 5  # node 1 -> 3: accepted
    logits[3, 4] = 5  # leaf -> 4: bonus
    path, bonus = walk_tree(branching_tree(), logits, TokenChooser(SamplingParams()))
    assert path == [0, 1, 3]
    assert bonus == 4


def test_greedy_walk_rejects_at_root():
    logits = torch.full((4, VOCAB), -5.0)
    logits[0, 5] = 5  # no child carries token 5
    path, bonus = walk_tree(branching_tree(), logits, TokenChooser(SamplingParams()))
    assert path == [0]
    assert bonus == 5


def test_greedy_choice_takes_first_maximum():
    # Rows of a vocabulary-sized width full of ties: the choice must be argmax's, the first maximal index.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (16, 49152), generator=generator).float()
    logits[3] = 7.0  # a row that is one long tie
    assert torch.equal(greedy_choice(logits), logits.argmax(dim=-1))


def exact_first_two(logits: torch.Tensor, chooser: TokenChooser, tree: DraftTree) -> torch.Tensor:
    """Exact joint distribution of the first two emitted tokens; the second is only defined after accepting a child."""
    probs = chooser.probabilities(logits)
    children = tree.children()[0]
    joint = torch.zeros(VOCAB, VOCAB + 1)  # column VOCAB: the cycle ended after the first token
    for first in range(VOCAB):
        if first in children:
            joint[first, :VOCAB] = probs[0, first] * probs[children[first]]
        else:
            joint[first, VOCAB] = probs[0, first]
    return joint


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True),
        SamplingParams(do_sample=True, temperature=0.6),
        SamplingParams(do_sample=True, top_k=3),
        SamplingParams(do_sample=True, top_p=0.7),
        SamplingParams(do_sample=True, temperature=1.4, top_k=4, top_p=0.9),
    ],
    ids=["plain", "temperature", "top_k", "top_p", "combined"],
)
def test_sampled_walk_matches_target_distribution(params):
    # Sample many walks over fixed logits; the emitted (first, second) pairs must follow the target's distribution.
    generator = torch.Generator().manual_seed(1234)
    logits = torch.randn(4, VOCAB, generator=generator) * 1.5
    tree = branching_tree()
    chooser = TokenChooser(params, generator)
    counts = torch.zeros(VOCAB, VOCAB + 1)
    samples = 6000
    for _ in range(samples):
        path, bonus = walk_tree(tree, logits, chooser)
        if len(path) == 1:
            counts[bonus, VOCAB] += 1
        else:
            counts[int(tree.tokens[path[1]]), bonus if len(path) == 2 else int(tree.tokens[path[2]])] += 1
    expected = exact_first_two(logits, chooser, tree) * samples
    support = expected.view(-1) > 0
    # Outcomes outside the warped support must never appear.
    assert counts.view(-1)[~support].sum() == 0
    result = chisquare(counts.view(-1)[support], expected.view(-1)[support])
    assert result.pvalue > 1e-3, result


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)


def reference_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The warped distribution written out from the definitions: temperature, then top-k, then top-p (nucleus).

    Top-p keeps a token when the tokens ranked above it have a total probability below top_p, so the kept set is the
    smallest prefix of the ranking that reaches top_p.
    """
    scaled = logits.double() / params.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if params.top_k:
        keep &= scaled >= scaled.topk(params.top_k, dim=-1).values[:, -1:]
    probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
    if params.top_p < 1.0:
        ranked, order = probs.sort(dim=-1, descending=True)
        above = ranked.cumsum(dim=-1) - ranked
        keep &= torch.zeros_like(keep).scatter(-1, order, above < params.top_p)
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
    return probs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=0.6),
        SamplingParams(do_sample=True, top_k=3),
        SamplingParams(do_sample=True, top_p=0.7),
        SamplingParams(do_sample=True, temperature=1.4, top_k=20, top_p=0.6),
    ],
    ids=["temperature", "top_k", "top_p", "combined"],
)
def test_warped_probabilities_match_definitions(params):
    # The sampled-walk test above takes its expected distribution from the chooser itself, so a warper that is never
    # applied would pass it. Here each warper is checked against its definition, support first.
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(5)) * 2
    probs = TokenChooser(params).probabilities(logits)
    expected = reference_probabilities(logits, params)
    assert torch.equal(probs > 0, expected > 0)
    if params.top_k:
        assert ((probs > 0).sum(dim=-1) <= params.top_k).all()
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-6)


def test_sampling_uses_given_generator():
    # The same seeded generator gives the same tokens whatever the global random state, so --seed reproduces output.
    logits = torch.zeros(64, VOCAB)  # uniform rows: every draw depends on the random state
    params = SamplingParams(do_sample=True)
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        draws.append(TokenChooser(params, torch.Generator().manual_seed(3)).choose(logits))
    assert torch.equal(draws[0], draws[1])
