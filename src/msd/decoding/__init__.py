"""Draft trees, verification and the speculative generation loop."""

from msd.decoding.drafter import Drafter, MSDDrafter, RootOnlyDrafter
from msd.decoding.generate import GenerationOutput, GenerationStats, SpeculativeGenerator
from msd.decoding.tree import DraftTree, TreeParams
from msd.decoding.verify import SamplingParams, TokenChooser, walk_tree

__all__ = [
    "DraftTree",
    "Drafter",
    "GenerationOutput",
    "GenerationStats",
    "MSDDrafter",
    "RootOnlyDrafter",
    "SamplingParams",
    "SpeculativeGenerator",
    "TokenChooser",
    "TreeParams",
    "walk_tree",
]
