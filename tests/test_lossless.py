"""Greedy output of speculative decoding equals the target's own `generate`, token for token.

The case table crosses prompts (short, long), image counts and sizes, drafters (the random MSD draft, an oracle that
proposes the target's continuation, the oracle with wrong siblings), tree shapes, max_new_tokens values that end in
the middle of a tree, and an EOS token that falls inside a tree.
"""

import itertools

import pytest
import torch

from msd.decoding import SpeculativeGenerator, TreeParams
from msd.decoding.generate import StopChecker
from msd.draft import DraftConfig, DraftModel
from oracle import OracleDrafter
from conftest import Family
from tiny_models import CORPUS, TinyQwen2VL, random_image

PROMPTS = {"short": "Hi", "long": " ".join(CORPUS * 3)}
IMAGE_SETS = {
    "none": [],
    "one": [(80, 60)],
    "two_mixed": [(120, 90), (40, 150)],
    "three": [(56, 56), (100, 70), (70, 100)],
}
TREES = [TreeParams(1, 1, 2), TreeParams(3, 2, 6), TreeParams(4, 4, 16), TreeParams(6, 8, 48), TreeParams(5, 10, 60)]
DRAFTERS = ["msd_random", "oracle", "oracle_decoys"]
MAX_NEW = [1, 9, 23]


def make_cases():
    """54 cases: every drafter and tree shape, cycling through prompts, images and lengths."""
    cases = []
    combos = itertools.product(DRAFTERS, range(len(TREES)), PROMPTS, IMAGE_SETS)
    for index, (drafter, tree, prompt, image_set) in enumerate(combos):
        if index % 5 >= 2 and drafter == "msd_random":  # the random draft is rarely accepted: fewer of those
            continue
        cases.append((drafter, tree, prompt, image_set, MAX_NEW[index % 3], index % 4 == 0))
        if len(cases) == 54:
            break
    return cases


CASES = make_cases()


def build_drafter(kind, family, inputs, max_new_tokens, tree):
    if kind == "msd_random":
        torch.manual_seed(7)
        return DraftModel(DraftConfig.for_target(family.target))
    # The continuation covers the longest generation plus a full tree beyond it, with EOS ignored.
    plain = SpeculativeGenerator(family.target, None)
    continuation = plain.generate(inputs, max_new_tokens=max_new_tokens + tree.depth + 2, eos_token_ids=[]).token_ids
    return OracleDrafter(continuation, family.target.vocab_size, decoys=2 if kind == "oracle_decoys" else 0)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, case)) for case in CASES])
def test_greedy_matches_generate(family, case):
    drafter_kind, tree_index, prompt, image_set, max_new_tokens, eos_inside = case
    tree = TREES[tree_index]
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SETS[image_set])]
    inputs = family.make_inputs(PROMPTS[prompt], images)

    eos = None
    if eos_inside:
        # Make a token the target emits mid-answer the EOS token, so generation stops inside a verified tree.
        free_run = family.reference(inputs, 12, eos_token_id=-1)
        eos = free_run[min(5, len(free_run) - 1)]
    expected = family.reference(inputs, max_new_tokens, eos_token_id=eos)

    drafter = build_drafter(drafter_kind, family, inputs, max_new_tokens, tree)
    generator = SpeculativeGenerator(family.target, drafter, tree)
    output = generator.generate(inputs, max_new_tokens=max_new_tokens, eos_token_ids=None if eos is None else [eos])
    assert output.token_ids == expected


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_oracle_reaches_max_tau(family, images, depth):
    # An oracle chain is accepted whole every cycle: tau = depth + 1 and the output is unchanged.
    inputs = family.make_inputs("Describe the picture", images[:1])
    max_new_tokens = 1 + 4 * (depth + 1)
    plain = SpeculativeGenerator(family.target, None)
    continuation = plain.generate(inputs, max_new_tokens=max_new_tokens + depth + 2, eos_token_ids=[]).token_ids
    drafter = OracleDrafter(continuation, family.target.vocab_size)
    tree = TreeParams(depth=depth, top_k=4, total_tokens=depth + 1)
    output = SpeculativeGenerator(family.target, drafter, tree).generate(
        inputs, max_new_tokens=max_new_tokens, eos_token_ids=[]
    )
    assert output.token_ids == continuation[:max_new_tokens]
    assert output.stats.tau == depth + 1
    assert output.stats.target_forwards == 4


def test_plain_decoding_matches_generate(family, images):
    # The baseline path (no draft) must itself be exact, since speedups are measured against it.
    inputs = family.make_inputs("What is this?", images[:2])
    output = SpeculativeGenerator(family.target, None).generate(inputs, max_new_tokens=20)
    assert output.token_ids == family.reference(inputs, 20)
    assert output.stats.tau == 1.0


@pytest.fixture(scope="module")
def qwen2_5_family():
    tiny = TinyQwen2VL(seed=1, version="2.5")
    return Family("qwen2_5_vl", tiny.model, tiny.inputs)


@pytest.mark.parametrize("case", CASES[::6], ids=["-".join(map(str, case)) for case in CASES[::6]])
def test_qwen2_5_vl_matches_generate(qwen2_5_family, case):
    # Qwen2.5-VL goes through the Qwen2-VL adapter; a subset of the case table checks it end to end.
    test_greedy_matches_generate(qwen2_5_family, case)


def test_stop_string_matches_generate(llava_family, images):
    # Generation ends on the token that completes a stop string, as transformers' generate(stop_strings=...) does.
    tokenizer = llava_family.processor.tokenizer
    inputs = llava_family.make_inputs("Describe", images[:1])
    free_run = llava_family.reference(inputs, 30, eos_token_id=-1)
    # A token that decodes to plain letters (byte-level pieces of multi-byte characters would not match as text).
    stop = next(
        piece for token in free_run[3:] if (piece := tokenizer.decode([token])).isascii() and piece.strip().isalpha()
    )
    expected = llava_family.model.generate(
        **inputs, max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=tokenizer, eos_token_id=-1
    )[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(expected) < 30
    continuation = free_run + [0] * 10
    drafter = OracleDrafter(continuation, llava_family.target.vocab_size, decoys=1)
    generator = SpeculativeGenerator(llava_family.target, drafter, TreeParams(4, 2, 9), tokenizer=tokenizer)
    output = generator.generate(inputs, max_new_tokens=30, stop_strings=[stop], eos_token_ids=[])
    assert output.token_ids == expected
    assert output.stats.stop_reason == "stop_string"


class ByteTokenizer:
    """A byte-level tokenizer in miniature: token id t is the byte t, as byte-level BPE pieces of emoji are."""

    def decode(self, token_ids, skip_special_tokens=False):
        return bytes(token_ids).decode("utf-8", errors="replace")


def test_stop_string_of_multibyte_characters():
    # Five emoji take 20 tokens of one byte each. The search window must span the stop's bytes, not its characters.
    stop = "\N{PARTY POPPER}" * 5
    text = ("ok " + stop + " more").encode("utf-8")
    checker = StopChecker([], [stop], ByteTokenizer(), max_new_tokens=100)
    accepted_tokens, reason = checker.accept([], list(text))
    assert reason == "stop_string"
    assert bytes(accepted_tokens).decode("utf-8") == "ok " + stop


class RecordingOracle(OracleDrafter):
    """An oracle drafter that keeps the arguments of every update call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.updates = []

    def update(self, new_tokens, accepted_hidden):
        self.updates.append((new_tokens.clone(), accepted_hidden.clone()))
        super().update(new_tokens, accepted_hidden)


def test_drafter_gets_accepted_hidden_states(family, images):
    # Row i of the features passed to the drafter is the target's feature at accepted node i, so under greedy decoding
    # its argmax is the cycle's token i + 1. Decoy siblings put the accepted nodes at 0, 1, 4, 7, not 0, 1, 2, 3.
    inputs = family.make_inputs("Describe the picture", images[:1])
    plain = SpeculativeGenerator(family.target, None)
    continuation = plain.generate(inputs, max_new_tokens=24, eos_token_ids=[]).token_ids
    drafter = RecordingOracle(continuation, family.target.vocab_size, decoys=2)
    SpeculativeGenerator(family.target, drafter, TreeParams(3, 3, 10)).generate(
        inputs, max_new_tokens=16, eos_token_ids=[]
    )
    assert any(tokens.shape[0] > 2 for tokens, _ in drafter.updates)  # some cycles accepted past a decoy
    for tokens, hidden in drafter.updates:
        assert hidden.shape[0] == tokens.shape[0]
        assert family.target.lm_head(hidden).argmax(dim=-1).tolist() == tokens.tolist()


@pytest.mark.parametrize("stop", ["eos", "max_new_tokens"])
def test_streamed_tokens_equal_output(llava_family, images, stop):
    # on_tokens (the CLI's text stream) receives exactly the returned tokens, also when a stop cuts a cycle short.
    inputs = llava_family.make_inputs("Describe", images[:1])
    free_run = llava_family.reference(inputs, 30, eos_token_id=-1)
    eos = [free_run[7]] if stop == "eos" else []
    drafter = OracleDrafter(free_run + [0] * 10, llava_family.target.vocab_size, decoys=1)
    streamed = []
    output = SpeculativeGenerator(llava_family.target, drafter, TreeParams(4, 2, 9)).generate(
        inputs, max_new_tokens=11, eos_token_ids=eos, on_tokens=streamed.extend
    )
    assert output.stats.stop_reason == stop
    assert output.stats.tau > 2  # cycles emitted several tokens, so a stop could fall inside one
    assert streamed == output.token_ids


def test_generation_stops_at_context_limit(llava_family, monkeypatch):
    # The prompt ends 6 tokens before the context limit. No tree node may sit past the limit, generation ends with
    # stop reason context_full, and the tokens until then equal generate's.
    target = llava_family.target
    limit = target.max_positions
    prompt = torch.arange(limit - 6) % 200 + 20
    assert not (prompt == target.image_token_id).any()
    inputs = {"input_ids": prompt[None], "attention_mask": torch.ones(1, prompt.shape[0], dtype=torch.long)}
    expected = llava_family.reference(inputs, 7, eos_token_id=-1)

    deepest = []
    forward_tree = target.forward_tree

    def recording_forward(state, tokens, depths, ancestor_mask):
        deepest.append(state.next_position + int(depths.max()))
        return forward_tree(state, tokens, depths, ancestor_mask)

    monkeypatch.setattr(target, "forward_tree", recording_forward)
    drafter = OracleDrafter(expected + [0] * 8, target.vocab_size)
    output = SpeculativeGenerator(target, drafter, TreeParams(4, 1, 5)).generate(
        inputs, max_new_tokens=50, eos_token_ids=[]
    )
    assert output.stats.stop_reason == "context_full"
    assert output.token_ids == expected
    assert max(deepest) == limit - 1
