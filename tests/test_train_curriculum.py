"""The two-stage curriculum: multimodal share per epoch, full use of both sources, determinism and resume."""

import numpy as np
import pytest

from msd.errors import MSDError
from msd.train.curriculum import MULTIMODAL, TEXT, Curriculum, CurriculumConfig, CurriculumPosition


def run_epochs(curriculum: Curriculum, epochs: int):
    position, step, plans = CurriculumPosition(), 0, []
    for epoch in range(epochs):
        plan = curriculum.plan(epoch, step, position)
        plans.append(plan)
        step += len(plan.sources) // curriculum.draws_per_step
        position = curriculum.advance(position, plan)
    return plans, position


def test_research_schedule_share_per_epoch():
    config = CurriculumConfig().resolve(40)
    curriculum = Curriculum(config, text_size=400, multimodal_size=600, draws_per_step=4, seed=0)
    plans, _ = run_epochs(curriculum, 40)

    for epoch in range(20):
        assert plans[epoch].multimodal_share == 0.0
    for epoch in range(20, 39):
        expected = 0.05 + 0.9 * (epoch - 20) / 18
        assert curriculum.multimodal_probability(epoch, 0) == pytest.approx(expected)
        draws = len(plans[epoch].sources)
        tolerance = 4 * np.sqrt(expected * (1 - expected) / draws) + 1e-9
        assert abs(plans[epoch].multimodal_share - expected) <= tolerance, epoch
    assert plans[39].multimodal_share == 1.0


def test_text_epoch_reads_every_text_sample_once():
    curriculum = Curriculum(CurriculumConfig().resolve(4), 12, 30, draws_per_step=4, seed=1)
    plans, _ = run_epochs(curriculum, 2)
    for plan in plans:
        assert sorted(plan.indices.tolist()) == list(range(12))
        assert (plan.sources == TEXT).all()


def test_multimodal_epoch_reads_the_longer_source_fully():
    config = CurriculumConfig(text_only=0, ramp=0)
    curriculum = Curriculum(config.resolve(1), text_size=5, multimodal_size=40, draws_per_step=4, seed=0)
    plan = curriculum.plan(0, 0, CurriculumPosition())
    assert (plan.sources == MULTIMODAL).all()
    assert sorted(plan.indices.tolist()) == list(range(40))


def test_shorter_source_cycles_through_passes():
    config = CurriculumConfig(text_only=0, ramp=2, ramp_start=0.5, ramp_end=0.5)
    curriculum = Curriculum(config, text_size=7, multimodal_size=50, draws_per_step=2, seed=0)
    plans, position = run_epochs(curriculum, 2)
    text = np.concatenate([plan.indices[plan.sources == TEXT] for plan in plans])
    assert len(text) > 7  # the short source is read more than once rather than ending the epoch
    full_passes = len(text) // 7
    for number in range(full_passes):
        assert sorted(text[number * 7 : (number + 1) * 7].tolist()) == list(range(7))
    assert position.text_read == len(text)


def test_plans_are_deterministic_and_resumable():
    config = CurriculumConfig().resolve(6)
    first = Curriculum(config, 30, 20, draws_per_step=2, seed=5)
    second = Curriculum(config, 30, 20, draws_per_step=2, seed=5)
    plans, _ = run_epochs(first, 6)
    again, _ = run_epochs(second, 6)
    for left, right in zip(plans, again):
        assert np.array_equal(left.sources, right.sources)
        assert np.array_equal(left.indices, right.indices)

    other, _ = run_epochs(Curriculum(config, 30, 20, draws_per_step=2, seed=6), 6)
    assert not np.array_equal(plans[4].indices, other[4].indices)


def test_step_unit_ramps_within_epochs():
    config = CurriculumConfig(unit="steps", text_only=10, ramp=11, ramp_start=0.0, ramp_end=1.0)
    curriculum = Curriculum(config, 100, 100, draws_per_step=4, seed=0)
    assert curriculum.multimodal_probability(0, 9) == 0.0
    assert curriculum.multimodal_probability(0, 10) == 0.0
    assert curriculum.multimodal_probability(0, 15) == pytest.approx(0.5)
    assert curriculum.multimodal_probability(0, 21) == 1.0
    plan = curriculum.plan(0, 0, CurriculumPosition())
    steps = plan.sources.reshape(-1, 4)
    assert steps[:10].sum() == 0
    assert steps[21:].all()


def test_missing_source_pins_probability():
    only_text = Curriculum(CurriculumConfig().resolve(4), 10, 0, draws_per_step=2, seed=0)
    assert only_text.multimodal_probability(3, 0) == 0.0
    only_vision = Curriculum(CurriculumConfig().resolve(4), 0, 10, draws_per_step=2, seed=0)
    assert only_vision.multimodal_probability(0, 0) == 1.0


def test_invalid_curriculum_raises():
    with pytest.raises(MSDError, match="unit"):
        CurriculumConfig(unit="hours")
    with pytest.raises(MSDError, match="ramp_end"):
        CurriculumConfig(ramp_end=1.5)
    with pytest.raises(MSDError, match="steps"):
        CurriculumConfig(unit="steps").resolve(4)
    with pytest.raises(MSDError, match="empty"):
        Curriculum(CurriculumConfig().resolve(4), 0, 0, draws_per_step=2, seed=0)
