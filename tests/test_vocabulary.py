"""The per-sequence draft vocabulary: a reduced draft vocabulary plus the prompt's other tokens."""

import torch

from msd.decoding import SpeculativeGenerator, TreeParams
from msd.decoding.drafter import MSDDrafter
from msd.decoding.vocabulary import DraftVocabulary
from msd.draft import DraftConfig, DraftModel

PROMPT = "Where does the cat sit on the mat?"


def reduced_draft(target, vocabulary_ids: list[int]) -> DraftModel:
    """A random draft that scores only the target tokens `vocabulary_ids`."""
    torch.manual_seed(3)
    draft = DraftModel(DraftConfig.for_target(target, draft_vocab_size=len(vocabulary_ids)))
    draft.draft_to_target.copy_(torch.tensor(vocabulary_ids))
    return draft.attach(target)


def test_prompt_tokens_added(llava_family):
    # Prompt tokens the draft lacks are added once each, in id order. Tokens it has and skipped ids are not.
    target = llava_family.target
    draft = reduced_draft(target, [0, 1, 2, 3, 4, 5])
    prompt = torch.tensor([2, 9, 7, 9, 1, 12, 30])
    vocabulary = DraftVocabulary.for_prompt(draft, target.lm_head.weight, prompt, skip_ids=[12])
    assert vocabulary.added_ids.tolist() == [7, 9, 30]


def test_full_vocabulary_draft_adds_nothing(llava_family):
    # A draft that scores the whole target vocabulary can already propose every prompt token.
    target = llava_family.target
    draft = DraftModel(DraftConfig.for_target(target)).attach(target)
    vocabulary = DraftVocabulary.for_prompt(draft, target.lm_head.weight, torch.tensor([5, 6, 7]))
    assert vocabulary.added_count == 0


def test_logits_and_ids_of_added_tokens(llava_family):
    # Added columns are the target LM head's rows on the draft's feature, and their indices map to those ids.
    target = llava_family.target
    draft = reduced_draft(target, [0, 1, 2, 3])
    vocabulary = DraftVocabulary.for_prompt(draft, target.lm_head.weight, torch.tensor([3, 20, 11]))
    hidden = torch.randn(5, target.hidden_size, dtype=target.dtype)
    logits = vocabulary.logits(hidden)
    assert logits.shape == (5, 6)
    assert torch.equal(logits[:, :4], draft.compute_logits(hidden))
    assert torch.allclose(logits[:, 4:], hidden @ target.lm_head.weight[[11, 20]].T)
    assert vocabulary.to_target_ids(torch.tensor([0, 3, 4, 5])).tolist() == [0, 3, 11, 20]


def test_drafter_proposes_only_known_tokens(llava_family):
    # Every proposed token is in the draft's vocabulary or the prompt, and a prompt token can be proposed.
    target = llava_family.target
    inputs = llava_family.make_inputs(PROMPT, [])
    prompt_ids = set(inputs["input_ids"][0].tolist())
    own_ids = [token for token in range(8) if token not in prompt_ids]
    drafter = MSDDrafter(reduced_draft(target, own_ids), target)
    prefill, state = target.prefill(inputs)
    drafter.start(prefill, state, int(prefill.logits.argmax()))
    tree = drafter.propose(0, TreeParams(depth=2, top_k=target.vocab_size, total_tokens=200), max_depth=2)
    proposed = set(tree.tokens[1:].tolist())
    assert proposed <= set(own_ids) | prompt_ids
    assert proposed & (prompt_ids - set(own_ids))


def test_prompt_vocabulary_stays_lossless(family, images):
    # Greedy output with a reduced draft and the prompt's tokens added equals the target's own generate.
    inputs = family.make_inputs(PROMPT, images[:1])
    expected = family.reference(inputs, 16)
    draft = reduced_draft(family.target, list(range(0, family.target.vocab_size, 3)))
    drafter = MSDDrafter(draft, family.target)
    output = SpeculativeGenerator(family.target, drafter, TreeParams(3, 4, 12)).generate(inputs, max_new_tokens=16)
    assert drafter.vocabulary.added_count > 0
    assert output.token_ids == expected
