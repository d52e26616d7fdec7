"""Training on self-distilled features of a tiny target raises the draft's top-1 agreement and tau."""

import copy

import pytest
import torch

from msd.data import collate_features
from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftModel
from msd.train import CurriculumConfig, DraftTrainer, TrainConfig, build_slots, compute_loss
from msd.train.loss import LossConfig
from tiny_models import llava_inputs
from train_helpers import QUESTIONS, prepare_folder, tiny_target


def agreement(draft, target, dataset) -> float:
    draft.attach(target).eval()
    slots = build_slots(collate_features([dataset[index] for index in range(len(dataset))]))
    with torch.no_grad():
        output = compute_loss(draft, draft, slots, LossConfig())
    return output.agreements / output.slots


@pytest.mark.parametrize("draft_layers", [1, 2])
def test_training_raises_agreement_and_tau(tmp_path, draft_layers):
    # A trained draft is accepted often, so its decoding exercises long accepted paths, which must still give the
    # target's own greedy output.
    target = tiny_target()
    text = prepare_folder(target, tmp_path / "text", 8, "text", answer_tokens=20)
    config = TrainConfig(epochs=60, micro_batch_size=2, gradient_accumulation=1, learning_rate=5e-3, warmup_steps=10,
                         mixed_precision="no", save_every=0, save_each_epoch=False, eval_samples=0, log_every=50,
                         draft_layers=draft_layers, curriculum=CurriculumConfig(text_only=60, ramp=0))
    trainer = DraftTrainer(config, target, text, None, tmp_path / "out")
    untrained = copy.deepcopy(trainer.draft)
    trained = DraftModel.from_pretrained(trainer.train())

    before, after = agreement(untrained, target, text), agreement(trained, target, text)
    assert after > before + 0.3

    inputs = llava_inputs(target.processor, QUESTIONS[2] + " Item 2.", [])
    tree = TreeParams(depth=4, top_k=4, total_tokens=16)
    tau_before = SpeculativeGenerator(target, untrained, tree).generate(inputs, max_new_tokens=20).stats.tau
    drafted = SpeculativeGenerator(target, trained, tree).generate(inputs, max_new_tokens=20)
    tau_after = drafted.stats.tau
    print(f"top-1 agreement {before:.3f} -> {after:.3f}; tau {tau_before:.2f} -> {tau_after:.2f}")
    assert trained.config.num_layers == draft_layers
    assert tau_after > tau_before + 0.3
    plain = target.model.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert drafted.token_ids == plain.tolist()
