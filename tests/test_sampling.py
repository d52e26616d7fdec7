"""Speculative sampling follows the target's distribution (chi-square tests on the first two tokens).

The second token is the first one that tree verification decides, so the test compares the joint distribution of
(token 1, token 2) from speculative sampling with the exact one computed from the target's logits, and checks that
the target's own `generate(do_sample=True)` fits the same exact distribution (so both use the same warpers).
"""

import pytest
import torch
from scipy.stats import chisquare

from msd.decoding import MSDDrafter, SamplingParams, SpeculativeGenerator, TokenChooser, TreeParams
from msd.decoding import drafter as drafter_module
from msd.decoding.lookup import NgramIndex
from msd.draft import DraftConfig, DraftModel
from msd.targets import adapter_for, batch_invariant
from msd.targets.cpu_linear import use_small_batch_linears
from oracle import OracleDrafter
from tiny_models import build_llava, llava_inputs

SAMPLES = 700


@pytest.fixture(scope="module", params=["stock_linears", "small_batch_linears", "batch_invariant_bfloat16"])
def peaked(request):
    """A one-layer tiny LLaVA whose LM head is scaled up, so its next-token distributions have a small support.

    It runs with PyTorch's linear layers, with the `SmallBatchLinear` layers that `load_target` uses on CPUs (whose
    few-token forwards take another kernel), and in bfloat16 with the batch-invariant kernels where the CPU has them.
    """
    bfloat16 = request.param == "batch_invariant_bfloat16"
    if bfloat16 and not batch_invariant.supported():
        pytest.skip("this CPU has no native bfloat16 support")
    model, processor = build_llava(seed=11, layers=1, dtype=torch.bfloat16 if bfloat16 else torch.float64)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    if request.param == "small_batch_linears":
        use_small_batch_linears(model)
    target = adapter_for(model)
    if bfloat16:
        batch_invariant.use_batch_invariant_kernels(target)
    inputs = llava_inputs(processor, "Hi", [])
    return model, target, inputs


def exact_joint(target, inputs, chooser) -> dict[tuple[int, int], float]:
    """P(token 1, token 2) under the target with the chooser's warpers, over tokens with probability > 1e-6."""
    prefill, _ = target.prefill(inputs)
    first = chooser.probabilities(prefill.logits[None])[0]
    joint = {}
    for token in (first > 1e-6).nonzero().view(-1).tolist():
        _, state = target.prefill(inputs)
        logits, _ = target.forward_tree(state, torch.tensor([token]), torch.tensor([0]), torch.ones(1, 1, dtype=bool))
        second = chooser.probabilities(logits)[0]
        for next_token in (second > 1e-6).nonzero().view(-1).tolist():
            joint[(token, next_token)] = float(first[token] * second[next_token])
    return joint


def goodness_of_fit(counts: dict, joint: dict, samples: int) -> float:
    """Chi-square p-value; outcomes expected fewer than 5 times are pooled into one bin."""
    observed, expected = [], []
    rest_observed, rest_expected = 0.0, 0.0
    for outcome, probability in joint.items():
        if probability * samples >= 5:
            observed.append(counts.get(outcome, 0))
            expected.append(probability * samples)
        else:
            rest_observed += counts.get(outcome, 0)
            rest_expected += probability * samples
    rest_observed += sum(count for outcome, count in counts.items() if outcome not in joint)
    rest_expected += max(samples - sum(expected) - rest_expected, 0.0)
    if rest_expected > 0:
        observed.append(rest_observed)
        expected.append(rest_expected)
    elif rest_observed > 0:
        return 0.0  # outcomes the target can never produce were observed
    scale = sum(observed) / sum(expected)
    return chisquare(observed, [value * scale for value in expected]).pvalue


def sample_pairs(generator, inputs, params, seed: int) -> tuple[dict[tuple[int, int], int], int]:
    """Count the first two tokens of SAMPLES speculative samples; also return the draft tokens accepted in all."""
    rng = torch.Generator().manual_seed(seed)
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for _ in range(SAMPLES):
        output = generator.generate(inputs, max_new_tokens=2, sampling=params, eos_token_ids=[], generator=rng)
        outcome = tuple(output.token_ids)
        counts[outcome] = counts.get(outcome, 0) + 1
        accepted += output.stats.accepted_lengths[0]
    return counts, accepted


CONFIGS = [
    SamplingParams(do_sample=True, temperature=1.0),
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, top_k=3),
    SamplingParams(do_sample=True, top_p=0.8),
]


@pytest.mark.parametrize("params", CONFIGS, ids=["temperature_1", "temperature_0.7", "top_k_3", "top_p_0.8"])
def test_speculative_sampling_matches_target(peaked, params):
    model, target, inputs = peaked
    joint = exact_joint(target, inputs, TokenChooser(params))
    assert len(joint) > 3  # the test is meaningless on a (near) deterministic distribution

    greedy = SpeculativeGenerator(target, None).generate(inputs, max_new_tokens=4, eos_token_ids=[]).token_ids
    drafter = OracleDrafter(greedy, target.vocab_size, decoys=2)
    generator = SpeculativeGenerator(target, drafter, TreeParams(depth=2, top_k=3, total_tokens=7))
    counts, accepted = sample_pairs(generator, inputs, params, seed=2024)
    assert accepted > 0  # some second tokens came from accepted draft candidates, not only bonus tokens
    assert goodness_of_fit(counts, joint, SAMPLES) > 1e-3


def test_msd_drafter_sampling_matches_target(peaked):
    # The MSD drafter, with a reduced vocabulary and the prompt's tokens added, keeps sampling exact.
    model, target, inputs = peaked
    params = SamplingParams(do_sample=True, temperature=1.0)
    joint = exact_joint(target, inputs, TokenChooser(params))
    # The draft's own vocabulary: the possible second tokens that are not in the prompt, which the drafter adds.
    prompt_ids = set(inputs["input_ids"][0].tolist())
    own_ids = sorted({second for _, second in joint} - prompt_ids)
    torch.manual_seed(5)
    draft = DraftModel(DraftConfig.for_target(target, draft_vocab_size=len(own_ids)))
    draft.draft_to_target.copy_(torch.tensor(own_ids))
    top_k = 8
    generator = SpeculativeGenerator(target, draft, TreeParams(depth=1, top_k=top_k, total_tokens=top_k + 1))
    counts, accepted = sample_pairs(generator, inputs, params, seed=7)
    assert generator.drafter.vocabulary.added_count > 0  # the prompt's tokens were added
    assert accepted > 0  # some second tokens came from the draft's candidates
    assert goodness_of_fit(counts, joint, SAMPLES) > 1e-3


def test_grafted_tokens_sampling_matches_target(peaked, monkeypatch):
    # Tokens grafted by the n-gram lookup keep sampling exact. Here the lookup proposes the most likely second token,
    # and the draft's vocabulary contains the 4 least likely second tokens, so nearly every accepted token is grafted.
    model, target, inputs = peaked
    params = SamplingParams(do_sample=True, temperature=1.0)
    joint = exact_joint(target, inputs, TokenChooser(params))
    best_next = {}
    for (first, second), probability in sorted(joint.items(), key=lambda item: item[1]):
        best_next[first] = second  # ascending order: the most likely second token is written last

    class BestNextIndex(NgramIndex):
        def continuation(self, count):
            best = best_next.get(self.tokens[-1])  # None after a first token of probability below 1e-6
            return [] if best is None else [best][:count]

    monkeypatch.setattr(drafter_module, "NgramIndex", BestNextIndex)
    second_probability = torch.zeros(target.vocab_size)
    for (_, second), probability in joint.items():
        second_probability[second] += probability
    own_ids = second_probability.argsort()[:4].tolist()
    torch.manual_seed(5)
    draft = DraftModel(DraftConfig.for_target(target, draft_vocab_size=len(own_ids)))
    draft.draft_to_target.copy_(torch.tensor(own_ids))
    drafter = MSDDrafter(draft, target, prompt_vocabulary=False)
    generator = SpeculativeGenerator(target, drafter, TreeParams(depth=1, top_k=2, total_tokens=3, lookup_tokens=1))
    counts, accepted = sample_pairs(generator, inputs, params, seed=11)
    assert drafter.grafts > 0
    assert accepted > 0  # some second tokens were grafted candidates the target accepted
    assert goodness_of_fit(counts, joint, SAMPLES) > 1e-3


def test_generate_sampling_fits_same_distribution(peaked):
    # transformers' own sampler must fit the exact distribution used above (same warper semantics).
    model, target, inputs = peaked
    params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.9)
    joint = exact_joint(target, inputs, TokenChooser(params))
    torch.manual_seed(99)
    counts: dict[tuple[int, int], int] = {}
    samples = 400
    for _ in range(samples):
        output = model.generate(
            **inputs, max_new_tokens=2, min_new_tokens=2, do_sample=True, temperature=0.7, top_p=0.9, top_k=0
        )
        outcome = tuple(output[0, inputs["input_ids"].shape[1] :].tolist())
        counts[outcome] = counts.get(outcome, 0) + 1
    assert goodness_of_fit(counts, joint, samples) > 1e-3
