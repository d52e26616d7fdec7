"""Side-by-side measurement of decoding methods: same process, batch 1, same inputs, warm-up first, interleaved.

For every sample, each method decodes the same processor inputs in turn. The order of methods rotates from one
sample to the next, so no method always runs first (on a cold cache) or last. Before any sample is measured, each
method decodes the first sample `warmup` times, which pays one-time costs (kernel selection, allocator growth, lazy
initialisation) outside the measurement. With `repeats` above 1, each sample is timed in that many rounds of all
methods, and each method keeps its run with the median time.

Before each sample, every method also decodes `UNTIMED_TOKENS` tokens of it, untimed. oneDNN builds its CPU kernels
for each new number of rows, about 10 ms for the embedded default target's prefill. The draft pads its prompts to a
multiple of 32 rows (`msd.draft.quantize`), and each new multiple costs up to about 20 ms more. Without that run the
method timed first on a sample would pay the target's share alone, and the MSD draft would pay its own share inside
the timing, costs that a process serving many prompts pays once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from msd.errors import MSDError
from msd.evaluate.methods import GenerationLimits, Method, MethodRun
from msd.evaluate.samples import EvalSample
from msd.prompts import build_inputs

logger = logging.getLogger(__name__)

#: new tokens per sample under the research convention, with stop strings and end-of-sequence tokens ignored
RESEARCH_FORCED_TOKENS = 512
#: tokens each method decodes untimed before a sample is measured: the second token makes a drafter read the prompt
UNTIMED_TOKENS = 2


@dataclass(frozen=True)
class BenchSettings:
    """Generation limits and warm-up of a bench run.

    max_new_tokens: the limit per sample; under research_convention, the exact number of tokens generated.
    research_convention: ignore stop strings and end-of-sequence tokens, so every sample runs to max_new_tokens
        (the protocol behind the published MSD speedups, with 512 tokens).
    stop_strings: replace each sample's own stop strings when not None.
    warmup: untimed runs of every method on the first sample before measuring.
    repeats: timed runs of every method on every sample; the run with the median total time is kept.
    """

    max_new_tokens: int = 256
    research_convention: bool = False
    stop_strings: tuple[str, ...] | None = None
    warmup: int = 1
    repeats: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise MSDError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.warmup < 0:
            raise MSDError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.repeats < 1:
            raise MSDError(f"--repeats must be at least 1, got {self.repeats}")

    def limits_for(self, sample: EvalSample) -> GenerationLimits:
        if self.research_convention:
            return GenerationLimits(self.max_new_tokens, (), ignore_eos=True)
        stop = self.stop_strings if self.stop_strings is not None else tuple(sample.stop_strings)
        return GenerationLimits(self.max_new_tokens, stop)


@dataclass
class SampleRecord:
    """One method's measurement on one sample, with everything the report needs."""

    sample_id: str
    task: str
    method: str
    token_ids: list[int]
    text: str | None
    new_tokens: int
    prefill_time: float | None
    decode_time: float | None
    total_time: float
    target_forwards: int
    accepted_lengths: list[int] | None

    @classmethod
    def from_run(cls, sample: EvalSample, method: str, run: MethodRun, text: str | None) -> SampleRecord:
        return cls(
            sample_id=sample.sample_id,
            task=sample.task,
            method=method,
            token_ids=run.token_ids,
            text=text,
            new_tokens=run.new_tokens,
            prefill_time=run.prefill_time,
            decode_time=run.decode_time,
            total_time=run.total_time,
            target_forwards=run.target_forwards,
            accepted_lengths=run.accepted_lengths,
        )

    def as_dict(self) -> dict:
        return asdict(self)


InputBuilder = Callable[[EvalSample], Mapping[str, torch.Tensor]]


def processor_inputs(processor) -> InputBuilder:
    """Build each sample's inputs with the target's processor and chat template."""

    def build(sample: EvalSample) -> Mapping[str, torch.Tensor]:
        return build_inputs(processor, sample.prompt, sample.images)

    return build


def run_bench(
    methods: Sequence[Method],
    samples: Sequence[EvalSample],
    settings: BenchSettings,
    build: InputBuilder,
    tokenizer=None,
    progress: bool = True,
) -> list[SampleRecord]:
    """Measure every method on every sample (see the module docstring); returns one record per method and sample.

    `methods` must start with the plain-decoding baseline. `tokenizer`, when given, decodes each output to text.
    """
    if not samples:
        raise MSDError("the evaluation set is empty; check the file or lower --limit.")
    if not methods or methods[0].name != "plain":
        raise ValueError("the first method must be the plain-decoding baseline named 'plain'")

    inputs = [build(sample) for sample in samples]  # fail on a bad prompt before any model runs
    warm_up(methods, inputs[0], settings.limits_for(samples[0]), settings.warmup)

    records = []
    for index, sample in enumerate(tqdm(samples, desc="bench", unit="sample", disable=not progress)):
        limits = settings.limits_for(sample)
        for method in methods:  # untimed: kernels for this prompt length
            method.run(inputs[index], replace(limits, max_new_tokens=UNTIMED_TOKENS))
        shift = index % len(methods)
        order = [*methods[shift:], *methods[:shift]]
        runs: dict[str, list[MethodRun]] = {method.name: [] for method in order}
        for _ in range(settings.repeats):  # each round runs every method once, so slow spells hit all methods
            for method in order:
                runs[method.name].append(method.run(inputs[index], limits))
        for method in order:
            run = median_run(runs[method.name])
            text = tokenizer.decode(run.token_ids, skip_special_tokens=True) if tokenizer is not None else None
            records.append(SampleRecord.from_run(sample, method.name, run, text))
            logger.debug("%s %s: %d tokens in %.3f s", sample.sample_id, method.name, run.new_tokens, run.total_time)
    return records


def median_run(runs: Sequence[MethodRun]) -> MethodRun:
    """Return the run with the median total time (the lower one of the middle two for an even count).

    Greedy decoding gives every run the same tokens. Should they differ, the first run's tokens are the ones a
    single run would have reported, so that run is kept.
    """
    if any(run.token_ids != runs[0].token_ids for run in runs):
        logger.warning("repeated runs of one method decoded different tokens; keeping the first run")
        return runs[0]
    return sorted(runs, key=lambda run: run.total_time)[(len(runs) - 1) // 2]


def warm_up(methods: Sequence[Method], inputs, limits: GenerationLimits, repeats: int) -> None:
    for _ in range(repeats):
        for method in methods:
            method.run(inputs, limits)
