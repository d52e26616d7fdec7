"""Unrolled training steps (training-time test) compute what the drafter computes at inference."""

import pytest
import torch
from transformers import DynamicCache

from msd.data import collate_features
from msd.draft import DraftConfig, DraftModel
from msd.draft.model import causal_mask
from msd.errors import MSDError
from msd.train import CurriculumConfig, DraftTrainer, TrainConfig, build_slots
from msd.train.loss import LossConfig, compute_loss, run_steps
from train_helpers import tiny_sources


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_sources(tmp_path_factory.mktemp("unroll"), 3, 2, answer_tokens=12)


def fresh_draft(target, num_layers=1):
    torch.manual_seed(4)
    return DraftModel(DraftConfig.for_target(target, num_layers=num_layers)).attach(target).eval()


def chain_output(draft, slots, sample: int, anchor: int, steps: int) -> torch.Tensor:
    """Draft the way the drafter does: slots 0 .. anchor on target features, then steps 2 .. `steps` one slot at a
    time, each reading the previous output and attending to the whole cache. Returns the last output (H,).

    The drafter never drafts a visual token; a visual slot here takes its visual embedding, as in training."""
    ids, positions = slots.token_ids[sample], slots.position_ids[:, sample]
    cache = DynamicCache()
    count = anchor + 1
    output = draft(
        ids[None, :count],
        slots.features[sample, None, :count],
        positions[:, None, :count],
        attention_mask=causal_mask(count, torch.float32, ids.device)[None, None],
        cache=cache,
        visual_embeds=slots.visual_embeds[sample, None, :count],
        visual_mask=slots.visual_mask[sample, None, :count],
    )[0, -1]
    for slot in range(anchor + 1, anchor + steps):
        mask = causal_mask(1, torch.float32, ids.device, cached=slot)
        output = draft(ids[None, slot : slot + 1], output[None, None], positions[:, None, slot : slot + 1],
                       attention_mask=mask[None, None], cache=cache,
                       visual_embeds=slots.visual_embeds[sample, None, slot : slot + 1],
                       visual_mask=slots.visual_mask[sample, None, slot : slot + 1])[0, -1]
    return output


@pytest.mark.parametrize("num_layers", [1, 2])
def test_unrolled_steps_match_sequential_drafting(setup, num_layers):
    # Step s at slot j must equal drafting s - 1 tokens one at a time after the anchor slot j - s + 1. The batch mixes
    # a text and an image sample of different lengths, so padding and visual slots are both in it. With two decoder
    # layers each layer keeps its own keys and values in the shared cache.
    target, text, vision = setup
    draft = fresh_draft(target, num_layers)
    batch = collate_features([text[0], vision[0]])
    slots = build_slots(batch)
    assert bool(slots.visual_mask.any())
    assert not bool(batch["attention_mask"].all())
    with torch.no_grad():
        steps = run_steps(draft, slots, slots.features, 3)
    checked = 0
    for sample in range(2):
        real = int(batch["attention_mask"][sample].sum()) - 1  # unpadded slots of this sample
        for step in (2, 3):
            for slot in range(step - 1, real, max(1, real // 6)):
                expected = chain_output(draft, slots, sample, slot - step + 1, step)
                torch.testing.assert_close(steps[step - 1][0][sample, slot], expected, rtol=1e-4, atol=1e-4)
                checked += 1
    assert checked >= 12


def test_counted_slots_need_whole_chain(setup):
    # A step-s slot counts only when the slot and its anchor both count, and never before slot s - 1.
    target, text, _ = setup
    slots = build_slots(collate_features([text[0], text[1]]))
    features = slots.features
    with torch.no_grad():
        steps = run_steps(lambda *args, **kwargs: torch.zeros_like(features), slots, features, 3)
    first = slots.counted
    for step, (_, counted) in enumerate(steps, start=1):
        assert not counted[:, : step - 1].any()
        assert bool((counted[:, step - 1 :] == (first[:, step - 1 :] & first[:, : first.shape[1] - step + 1])).all())
    assert steps[1][1].sum() < first.sum()


def test_loss_reports_each_step(setup):
    # With three steps the loss output carries three agreement counts, the first equal to the one-step count.
    target, text, _ = setup
    draft = fresh_draft(target)
    slots = build_slots(collate_features([text[0], text[1]]))
    with torch.no_grad():
        single = compute_loss(draft, draft, slots, LossConfig(unroll_steps=1))
        three = compute_loss(draft, draft, slots, LossConfig(unroll_steps=3))
    assert len(three.step_agreements) == 3
    assert len(three.step_slots) == 3
    assert (three.agreements, three.slots) == (single.agreements, single.slots)
    assert (three.step_agreements[0], three.step_slots[0]) == (single.agreements, single.slots)
    assert three.step_slots[2] < three.step_slots[1] < three.step_slots[0]


def test_batch_without_counted_slots(setup):
    # A batch with nothing to count still reports one zero count per step, which the trainer's evaluation sums.
    target, text, _ = setup
    draft = fresh_draft(target)
    slots = build_slots(collate_features([text[0]]))
    slots.counted = torch.zeros_like(slots.counted)
    with torch.no_grad():
        output = compute_loss(draft, draft, slots, LossConfig(unroll_steps=2))
    assert output.step_slots == (0, 0)
    assert output.step_agreements == (0, 0)
    assert float(output.loss) == 0.0


def test_more_steps_than_slots_run(setup):
    # Steps beyond the sequence length have no counted slot, so they add nothing and raise nothing.
    target, text, _ = setup
    draft = fresh_draft(target)
    slots = build_slots(collate_features([text[0], text[1]]))
    steps = slots.token_ids.shape[1] + 2
    with torch.no_grad():
        output = compute_loss(draft, draft, slots, LossConfig(unroll_steps=steps))
    assert len(output.step_slots) == steps
    assert output.step_slots[-1] == 0
    assert torch.isfinite(output.loss)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_invalid_unroll_steps_raise(value):
    with pytest.raises(MSDError, match="unroll_steps"):
        LossConfig(unroll_steps=value)


def test_trainer_logs_later_step_agreement(setup, tmp_path, caplog):
    # An unrolled run trains and reports held-out agreement for the second step next to the first.
    target, text, vision = setup
    config = TrainConfig(epochs=1, micro_batch_size=1, gradient_accumulation=1, mixed_precision="no", save_every=0,
                         save_each_epoch=False, eval_samples=1, log_every=1, warmup_steps=0,
                         loss=LossConfig(unroll_steps=2), curriculum=CurriculumConfig(text_only=1, ramp=0))
    with caplog.at_level("INFO"):
        DraftTrainer(config, target, text, vision, tmp_path / "out").train()
    assert "eval/text_top1_step2" in caplog.text
    assert "eval/text_top1 " in caplog.text
