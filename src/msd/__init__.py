"""msd: lossless speculative decoding for vision-language models with a multimodal draft."""

from msd.decoding import (
    DraftTree,
    Drafter,
    GenerationOutput,
    GenerationStats,
    MSDDrafter,
    SamplingParams,
    SpeculativeGenerator,
    TreeParams,
)
from msd.draft import DraftConfig, DraftModel
from msd.errors import MSDError
from msd.targets import TargetAdapter, adapter_for, load_target

__version__ = "0.1.0"

__all__ = [
    "DraftConfig",
    "DraftModel",
    "DraftTree",
    "Drafter",
    "GenerationOutput",
    "GenerationStats",
    "MSDDrafter",
    "MSDError",
    "SamplingParams",
    "SpeculativeGenerator",
    "TargetAdapter",
    "TreeParams",
    "adapter_for",
    "load_target",
]
