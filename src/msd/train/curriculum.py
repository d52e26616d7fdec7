"""The two-stage curriculum: which source (text or multimodal) each training sample is drawn from.

Schedule. Training runs a text-only stage, then a linear ramp of the probability p of drawing a multimodal sample
from `ramp_start` to `ramp_end`, then multimodal samples only. The stage lengths count epochs or optimizer steps
(`unit`). With the defaults and 40 epochs this is the MSD research schedule: epochs 1-20 text only, epochs 21-39
ramp p from 0.05 to 0.95, epoch 40 multimodal only.

Sources. Each source is read as an endless stream of passes; every pass is a fresh seeded permutation of the whole
source, and the stream's read position carries over from one epoch to the next. The shorter source therefore never
cuts an epoch short, and every sample of both sources is read once per pass.

Epoch length. An epoch draws round((1 - p) * N_text + p * N_multimodal) samples, with p at its first draw, rounded
down to whole optimizer steps (at least one). A text-only epoch is one pass over the text source, a multimodal-only
epoch one pass over the multimodal source.

Determinism. An epoch's plan depends only on the seed, the epoch number and how many samples each stream had given
before it (`CurriculumPosition`), so a run resumed from a saved position draws the same samples in the same order.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from msd.errors import MSDError
from msd.train.option_types import check_field_types

logger = logging.getLogger(__name__)

TEXT, MULTIMODAL = 0, 1
UNITS = ("epochs", "steps")


@dataclass(frozen=True)
class CurriculumConfig:
    """Stage lengths in `unit`; None derives the research split from the run's epochs (see `resolve`)."""

    unit: str = "epochs"
    text_only: int | None = None
    ramp: int | None = None
    ramp_start: float = 0.05
    ramp_end: float = 0.95

    def __post_init__(self):
        check_field_types(self, "curriculum option")
        if self.unit not in UNITS:
            raise MSDError(f"curriculum unit must be one of {', '.join(UNITS)}, got {self.unit!r}.")
        for name in ("text_only", "ramp"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise MSDError(f"curriculum {name} must be zero or positive, got {value}.")
        for name in ("ramp_start", "ramp_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MSDError(f"curriculum {name} must lie in [0, 1], got {getattr(self, name)}.")

    def resolve(self, epochs: int) -> CurriculumConfig:
        """Fill unset epoch-unit stages: the first half text only, a ramp, and a final multimodal-only epoch."""
        if self.unit == "steps" and (self.text_only is None or self.ramp is None):
            raise MSDError("a curriculum counted in steps needs both text_only and ramp lengths in optimizer steps.")
        text_only = epochs // 2 if self.text_only is None else self.text_only
        ramp = max(epochs - text_only - 1, 0) if self.ramp is None else self.ramp
        return CurriculumConfig(self.unit, text_only, ramp, self.ramp_start, self.ramp_end)


@dataclass
class CurriculumPosition:
    """Position of a run: the epoch, optimizer steps done in it, and stream positions at the epoch's start."""

    epoch: int = 0
    step_in_epoch: int = 0
    text_read: int = 0
    multimodal_read: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochPlan:
    """The samples of one epoch in order: source (TEXT or MULTIMODAL) and index into that source."""

    sources: np.ndarray  # (draws,) int8
    indices: np.ndarray  # (draws,) int64

    @property
    def multimodal_share(self) -> float:
        return float(self.sources.mean()) if len(self.sources) else 0.0


class Curriculum:
    """Draws each epoch's samples from the text and multimodal sources following the schedule.

    text_size / multimodal_size: samples in each source (either may be 0, which pins p to the other source);
    draws_per_step: samples one optimizer step consumes over all processes (micro-batch x accumulation x processes).
    """

    def __init__(self, config: CurriculumConfig, text_size: int, multimodal_size: int, draws_per_step: int, seed: int):
        if text_size + multimodal_size == 0:
            raise MSDError("both training sources are empty. Pass --text-data and/or --vision-data with samples.")
        if config.text_only is None or config.ramp is None:
            raise ValueError("resolve the curriculum config against the epoch count first")
        self.config = config
        self.sizes = (text_size, multimodal_size)
        self.draws_per_step = draws_per_step
        self.seed = seed

    def multimodal_probability(self, epoch: int, step: int) -> float:
        """p at `epoch` (0-based) or at global optimizer `step`, depending on the config's unit."""
        if self.sizes[MULTIMODAL] == 0:
            return 0.0
        if self.sizes[TEXT] == 0:
            return 1.0
        config = self.config
        now = epoch if config.unit == "epochs" else step
        if now < config.text_only:
            return 0.0
        into_ramp = now - config.text_only
        if into_ramp >= config.ramp:
            return 1.0
        fraction = into_ramp / (config.ramp - 1) if config.ramp > 1 else 0.0
        return config.ramp_start + (config.ramp_end - config.ramp_start) * fraction

    def epoch_steps(self, epoch: int, first_step: int) -> int:
        """Optimizer steps in `epoch`, which begins at global step `first_step`."""
        p = self.multimodal_probability(epoch, first_step)
        draws = (1.0 - p) * self.sizes[TEXT] + p * self.sizes[MULTIMODAL]
        return max(int(round(draws)) // self.draws_per_step, 1)

    def epoch_starts(self, epochs: int) -> list[int]:
        """Return the global optimizer step at which each of epochs 0 .. `epochs` begins (`epochs` + 1 values)."""
        starts = [0]
        for epoch in range(epochs):
            starts.append(starts[-1] + self.epoch_steps(epoch, starts[-1]))
        return starts

    def plan(self, epoch: int, first_step: int, position: CurriculumPosition) -> EpochPlan:
        """List the samples of `epoch`. `position` gives the stream positions at the epoch's start."""
        steps = self.epoch_steps(epoch, first_step)
        draws = steps * self.draws_per_step
        rng = np.random.default_rng([self.seed, epoch])
        if self.config.unit == "epochs":
            probability = np.full(draws, self.multimodal_probability(epoch, first_step))
        else:
            step_of_draw = first_step + np.arange(draws) // self.draws_per_step
            probability = np.array([self.multimodal_probability(epoch, int(step)) for step in step_of_draw])
        sources = (rng.random(draws) < probability).astype(np.int8)

        indices = np.empty(draws, dtype=np.int64)
        starts = (position.text_read, position.multimodal_read)
        for source in (TEXT, MULTIMODAL):
            chosen = np.flatnonzero(sources == source)
            indices[chosen] = self._stream(source, starts[source], len(chosen))
        return EpochPlan(sources=sources, indices=indices)

    def advance(self, position: CurriculumPosition, plan: EpochPlan) -> CurriculumPosition:
        """Compute the position at the start of the epoch after the one `plan` covers."""
        multimodal = int(plan.sources.sum())
        return CurriculumPosition(
            epoch=position.epoch + 1,
            step_in_epoch=0,
            text_read=position.text_read + len(plan.sources) - multimodal,
            multimodal_read=position.multimodal_read + multimodal,
        )

    def _stream(self, source: int, start: int, count: int) -> np.ndarray:
        """Stream items start .. start + count of `source`: pass k is a permutation seeded by (seed, source, k)."""
        size = self.sizes[source]
        if count == 0:
            return np.empty(0, dtype=np.int64)
        items = np.arange(start, start + count)
        passes = items // size
        result = np.empty(count, dtype=np.int64)
        for pass_number in np.unique(passes):
            permutation = np.random.default_rng([self.seed, 1000 + source, int(pass_number)]).permutation(size)
            where = passes == pass_number
            result[where] = permutation[items[where] % size]
        return result
