"""Decoding settings of the default model for the CPU msd runs on, chosen from measured costs (BENCHMARKS.md).

On a CPU with native bfloat16 support (AMX), the target runs in bfloat16 with msd's batch-invariant kernels, where a
forward over 16 tokens costs about 1.3 plain steps, so a tree of 16 tokens pays. On the four validation questions of
`benchmarks/default_draft/tree_validation.jsonl` (2-core Emerald Rapids Xeon), depth 4 with 4 children per node gave
1.62x on average. Depth 5 with the same 16 tokens gave 1.58x, an 8-token tree 1.47x and a chain of 3 tokens 1.42x.
Elsewhere the target runs in float32, where 4 or more tokens cost about 1.5 plain steps, so a chain of two drafted
tokens is kept.
"""

from __future__ import annotations

import torch

from msd.targets import batch_invariant

BFLOAT16_OPTIONS = ("--dtype", "bfloat16", "--depth", "4", "--tree-top-k", "4", "--total-tokens", "16")
FLOAT32_OPTIONS = ("--dtype", "float32", "--depth", "2", "--tree-top-k", "1", "--total-tokens", "3")


def has_amx() -> bool:
    """True when this CPU has AMX tiles, where the bfloat16 cost curve above was measured."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def decoding_options() -> tuple[str, ...]:
    """Return the `msd generate`/`msd bench` options (dtype and tree) for the default model on this machine's CPU.

    CPUs with bfloat16 dot products but no AMX (AVX-512 BF16 alone) get float32: the flat cost curve comes from AMX.
    """
    return BFLOAT16_OPTIONS if batch_invariant.supported() and has_amx() else FLOAT32_OPTIONS
