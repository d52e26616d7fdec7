"""Slot weighting: every counted slot of an optimizer step weighs the same, whatever micro-batch it falls in."""

import pytest
import torch

from msd.data import collate_features
from msd.draft import DraftConfig, DraftModel
from msd.train import CurriculumConfig, DraftTrainer, TrainConfig, build_slots
from msd.train.data import open_feature_folders
from msd.train.loss import LossConfig, compute_loss, count_step_slots
from train_helpers import prepare_folder, tiny_target


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny target and one feature folder holding a short and a long answer."""
    folder = tmp_path_factory.mktemp("weighting")
    target = tiny_target()
    prepare_folder(target, folder / "short", 1, "text", answer_tokens=3)
    prepare_folder(target, folder / "long", 1, "text", answer_tokens=16)
    return target, open_feature_folders([folder / "short" / "features", folder / "long" / "features"])


def gradients(draft) -> list[torch.Tensor]:
    return [parameter.grad.clone() for parameter in draft.parameters() if parameter.grad is not None]


def test_split_batch_matches_merged_mean(setup):
    # Two micro-batches divided by the step's slot totals give the loss and gradients of one batch holding both
    # samples, for each of two unrolled steps. The samples' slot counts differ, so per-batch means would not.
    target, dataset = setup
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.for_target(target)).attach(target)
    config = LossConfig(unroll_steps=2)
    short, long = build_slots(collate_features([dataset[0]])), build_slots(collate_features([dataset[1]]))
    counts = [count_step_slots(slots.counted, 2) for slots in (short, long)]
    assert counts[0][0] != counts[1][0]
    totals = tuple(a + b for a, b in zip(*counts))

    split = sum(compute_loss(draft, draft, slots, config, slot_totals=totals).loss for slots in (short, long))
    split.backward()
    split_gradients = gradients(draft)
    draft.zero_grad()
    merged = compute_loss(draft, draft, build_slots(collate_features([dataset[0], dataset[1]])), config).loss
    merged.backward()

    assert torch.allclose(split, merged, atol=1e-6)
    for split_gradient, merged_gradient in zip(split_gradients, gradients(draft), strict=True):
        assert torch.allclose(split_gradient, merged_gradient, atol=1e-6)


def first_step_gradients(setup, tmp_path, micro_batch_size: int, gradient_accumulation: int) -> list[torch.Tensor]:
    """Train one optimizer step on both samples and return the gradients it applied."""
    target, dataset = setup
    config = TrainConfig(epochs=1, micro_batch_size=micro_batch_size, gradient_accumulation=gradient_accumulation,
                         learning_rate=1e-3, warmup_steps=0, mixed_precision="no", save_every=0,
                         save_each_epoch=False, eval_samples=0, log_every=1, loss=LossConfig(noise_width=0.0),
                         curriculum=CurriculumConfig(text_only=1, ramp=0))
    torch.manual_seed(0)
    trainer = DraftTrainer(config, target, dataset, None, tmp_path)
    recorded = []
    apply_step = trainer._optimizer_step

    def record_and_step():
        recorded.append(gradients(trainer.draft))
        apply_step()

    trainer._optimizer_step = record_and_step
    trainer.train(stop_at_step=1)
    return recorded[0]


def test_accumulation_matches_one_batch(setup, tmp_path):
    # Accumulating two single-sample micro-batches of different lengths applies the gradient of one two-sample
    # micro-batch: the mean over all counted slots of the step.
    accumulated = first_step_gradients(setup, tmp_path / "accumulated", micro_batch_size=1, gradient_accumulation=2)
    single = first_step_gradients(setup, tmp_path / "single", micro_batch_size=2, gradient_accumulation=1)
    for accumulated_gradient, single_gradient in zip(accumulated, single, strict=True):
        assert torch.allclose(accumulated_gradient, single_gradient, atol=1e-6)


def test_float16_output_outside_slots_stays_finite(setup):
    # DeepSpeed fp16 runs the draft in float16 without autocast, and a float16 sum over its whole output can
    # overflow to inf. The loss takes only the counted slots, so it stays finite.
    target, dataset = setup
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.for_target(target)).attach(target)
    slots = build_slots(collate_features([dataset[0], dataset[1]]))

    def float16_forward(*args, **kwargs):
        return (draft(*args, **kwargs) + 400.0).half()

    assert torch.isinf(float16_forward(slots.token_ids, slots.features, slots.position_ids, slots.attention_mask,
                                       visual_embeds=slots.visual_embeds, visual_mask=slots.visual_mask).sum())
    output = compute_loss(float16_forward, draft, slots, LossConfig(noise_width=0.0))
    assert torch.isfinite(output.loss)
