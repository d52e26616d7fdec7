"""Reduced draft vocabulary in training: the choice of ids, training through it, reload and lossless decoding."""

import pytest
import torch

from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftConfig, DraftModel
from msd.errors import MSDError
from msd.train import CurriculumConfig, DraftTrainer, TrainConfig
from msd.train.loss import count_agreements
from msd.train.vocab import choose_draft_vocab, count_loss_tokens
from tiny_models import llava_inputs
from train_helpers import prepare_folder, tiny_target

VOCAB = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    target = tiny_target()
    text = prepare_folder(target, tmp_path_factory.mktemp("features"), 8, "text", answer_tokens=10)
    return target, text


def config(**options) -> TrainConfig:
    values = dict(epochs=2, micro_batch_size=2, gradient_accumulation=1, learning_rate=1e-3, warmup_steps=1,
                  mixed_precision="no", save_every=0, save_each_epoch=False, eval_samples=0, log_every=1,
                  draft_vocab_size=VOCAB, curriculum=CurriculumConfig(text_only=2, ramp=0))
    values.update(options)
    return TrainConfig(**values)


def sample(ids, mask):
    return {"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask, dtype=torch.bool)}


def test_counts_only_loss_positions_past_the_first_slot():
    samples = [sample([5, 5, 1, 2, 2], [1, 1, 0, 1, 1]), sample([3, 2, 4], [0, 0, 1])]
    assert count_loss_tokens(samples, 6).tolist() == [0, 0, 2, 0, 1, 0]


def test_choice_keeps_always_ids_then_most_frequent_sorted():
    counts = torch.tensor([0, 9, 3, 3, 7, 0, 1])
    assert choose_draft_vocab(counts, 3).tolist() == [1, 2, 4]  # tie between ids 2 and 3 goes to 2
    assert choose_draft_vocab(counts, 3, always=[6]).tolist() == [1, 4, 6]


@pytest.mark.parametrize("size, always", [(1, [0]), (8, []), (2, [9])])
def test_bad_vocab_sizes_raise(size, always):
    with pytest.raises(MSDError):
        choose_draft_vocab(torch.ones(7, dtype=torch.long), size, always)


def test_config_rejects_tiny_vocab():
    with pytest.raises(MSDError, match="draft_vocab_size"):
        config(draft_vocab_size=1)


def test_agreement_uses_the_whole_target_vocabulary():
    head = torch.eye(4)  # (V=4, H=4): the target's top-1 is the feature's largest coordinate
    draft = DraftModel(DraftConfig("llava", {"model_type": "llama", "hidden_size": 4, "vocab_size": 4,
                                             "num_attention_heads": 1, "num_key_value_heads": 1,
                                             "intermediate_size": 8}, draft_vocab_size=2))
    draft.draft_to_target.copy_(torch.tensor([0, 1]))
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.0, 1.0]])  # target top-1: ids 1 and 3
    draft_logits = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # the draft picks id 1 both times
    target_probs = torch.softmax(expected[:, :2], dim=-1)  # renormalised over ids 0 and 1
    assert count_agreements(draft, draft_logits, target_probs, expected, head) == 1
    assert count_agreements(draft, draft_logits, target_probs, expected, None) == 2


def test_trained_reduced_draft_reloads_and_decodes_losslessly(tmp_path, setup):
    target, text = setup
    samples = (text[index] for index in range(len(text)))
    counts = count_loss_tokens(samples, target.vocab_size)
    trainer = DraftTrainer(config(), target, text, None, tmp_path)
    chosen = trainer.draft.draft_to_target
    assert set(target.eos_token_ids) <= set(chosen.tolist())
    assert torch.equal(chosen, torch.sort(chosen).values)
    held_out = set(trainer.sources[next(iter(trainer.sources))].held_out.tolist())
    assert not held_out  # eval_samples=0, so the counts above cover exactly the training samples
    others = [token for token in chosen.tolist() if token not in target.eos_token_ids]
    rest = torch.ones(target.vocab_size, dtype=torch.bool)
    rest[chosen] = False
    assert min(counts[others]) >= counts[rest].max()  # nothing left out is more frequent than what was kept

    draft = DraftModel.from_pretrained(trainer.train())
    assert draft.config.draft_vocab_size == VOCAB
    assert torch.equal(draft.draft_to_target, chosen)

    inputs = llava_inputs(target.processor, "Where does the cat sit?", [])
    plain = SpeculativeGenerator(target, None).generate(inputs, max_new_tokens=10)
    drafted = SpeculativeGenerator(target, draft, TreeParams(depth=3, top_k=2, total_tokens=6)).generate(
        inputs, max_new_tokens=10
    )
    assert drafted.token_ids == plain.token_ids


def test_init_draft_with_other_vocab_size_raises(tmp_path, setup):
    target, text = setup
    fresh = DraftModel(DraftConfig.for_target(target))
    with pytest.raises(MSDError, match="draft_vocab_size"):
        DraftTrainer(config(), target, text, None, tmp_path, draft=fresh)
