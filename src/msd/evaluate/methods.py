"""Decoding methods that `msd bench` compares, each run on one sample with the same inputs and limits.

Two kinds:

- `EngineMethod` runs msd's own loop (`SpeculativeGenerator`): plain decoding (no draft), the MSD draft, or an
  EAGLE-style draft that does not decouple visual tokens. It reports prefill and decode time separately, target
  forwards and the accepted length of every cycle.
- `TransformersMethod` runs `model.generate`: plain (the `generate` method, a check that msd's own plain loop is as
  fast as transformers'), or with transformers' prompt-lookup or assisted decoding. transformers
  exposes neither a prefill/decode split nor accepted lengths, so these runs are timed end to end, and their target
  forwards are counted with a forward hook on the target model.

All methods decode greedily, so each must reproduce plain decoding token for token.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

from msd.decoding import SpeculativeGenerator
from msd.targets.base import TargetAdapter

#: method names in report order; `plain` is the baseline every other method is compared with
METHOD_NAMES = ("plain", "generate", "msd", "eagle", "prompt-lookup", "assisted")


@dataclass(frozen=True)
class GenerationLimits:
    """When generation stops. ignore_eos keeps generating through end-of-sequence tokens (forced length)."""

    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class MethodRun:
    """One method's result on one sample. Times are wall-clock seconds."""

    token_ids: list[int]
    total_time: float
    target_forwards: int  # decoding forwards of the target, prefill excluded
    prefill_time: float | None = None  # None where the method does not expose it
    accepted_lengths: list[int] | None = None  # accepted draft tokens per target forward, bonus excluded

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_time(self) -> float | None:
        return None if self.prefill_time is None else self.total_time - self.prefill_time


class Method(ABC):
    """A way of decoding one sample; see the module docstring."""

    name: str

    @abstractmethod
    def run(self, inputs: Mapping[str, torch.Tensor], limits: GenerationLimits) -> MethodRun:
        """Decode one sample (processor inputs, batch 1) greedily."""


class EngineMethod(Method):
    """msd's speculative loop with a draft model, or plain decoding through the same adapter when the draft is None."""

    def __init__(self, name: str, generator: SpeculativeGenerator):
        self.name = name
        self.generator = generator

    def run(self, inputs: Mapping[str, torch.Tensor], limits: GenerationLimits) -> MethodRun:
        output = self.generator.generate(
            inputs,
            max_new_tokens=limits.max_new_tokens,
            eos_token_ids=[] if limits.ignore_eos else None,
            stop_strings=limits.stop_strings,
        )
        stats = output.stats
        return MethodRun(
            token_ids=output.token_ids,
            total_time=stats.total_time,
            target_forwards=stats.target_forwards,
            prefill_time=stats.prefill_time,
            accepted_lengths=list(stats.accepted_lengths),
        )


class TransformersMethod(Method):
    """`model.generate`, alone or with extra keyword arguments (prompt_lookup_num_tokens, assistant_model), timed end
    to end."""

    def __init__(self, name: str, target: TargetAdapter, tokenizer, **generate_options):
        self.name = name
        self.target = target
        self.model = target.model
        self.device = target.device
        self.tokenizer = tokenizer
        self.generate_options = generate_options
        self.forward_calls = 0
        self.model.register_forward_hook(self._count_forward)

    def _count_forward(self, module, args, output) -> None:
        self.forward_calls += 1

    @torch.no_grad()
    def run(self, inputs: Mapping[str, torch.Tensor], limits: GenerationLimits) -> MethodRun:
        inputs = {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in inputs.items()}
        config = GenerationConfig(**self.model.generation_config.to_dict())
        config.do_sample = False
        config.max_new_tokens = limits.max_new_tokens
        config.min_new_tokens = None
        if limits.ignore_eos:
            # None would be refilled from the model's generation config (transformers 5.25), and an empty list leaves
            # no end-of-sequence token. transformers then still requires a pad token, which no finished sequence
            # ever emits here.
            if config.pad_token_id is None:
                config.pad_token_id = next(iter(self.target.eos_token_ids), 0)
            config.eos_token_id = []
        options = {}
        for key, value in self.generate_options.items():  # generation settings go in the config, models as arguments
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                options[key] = value
        if limits.stop_strings:
            # A stopping criterion rather than `stop_strings=`: assisted generation would pass the strings on to the
            # assistant, which has no tokenizer to match them with.
            criterion = StopStringCriteria(self.tokenizer, list(limits.stop_strings))
            options["stopping_criteria"] = StoppingCriteriaList([criterion])

        self.forward_calls = 0
        start = wall_clock(self.device)
        output = self.model.generate(**inputs, generation_config=config, **options)
        total_time = wall_clock(self.device) - start

        prompt_length = inputs["input_ids"].shape[1]
        return MethodRun(
            token_ids=output[0, prompt_length:].tolist(),
            total_time=total_time,
            target_forwards=max(self.forward_calls - 1, 0),  # the first call is the prefill
        )


def wall_clock(device: torch.device) -> float:
    """Seconds from a monotonic clock, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
