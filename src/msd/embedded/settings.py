"""Decoding settings of the default model for the CPU msd runs on, chosen from measured costs (BENCHMARKS.md).

On a CPU with native bfloat16 support (AMX), the target runs in bfloat16 with msd's batch-invariant kernels, where a
forward over 16 tokens costs about 1.2 plain steps, so a tree of 16 tokens pays. On the four validation questions of
`benchmarks/default_draft/tree_validation.jsonl` (2-core Emerald Rapids Xeon), two 16-token trees gave 1.70x on
average: depth 3 and depth 2, each with 8 children per node. Other 16-token trees gave 1.68x (depth 3, 6 children),
1.61-1.63x (depth 4, 4 children) and 1.58x (depth 5). Smaller trees gave less: 1.49x for 12 tokens, 1.47x for 8
and 1.41x for a chain of 3. Depth 3 is kept because its tau was the highest (2.41, against 2.29 at depth 2 and 2.37
at depth 4), and each further draft step costs about 1.2 ms. Those numbers are from an earlier draft. The committed
draft, on the same questions plus three matplotlib sample pictures, confirmed the choice: 1.90x at depth 3 with 8
children, 1.86-1.88x at depth 4, 1.81x at depth 5 and 1.78x at depth 2.

Elsewhere the target runs in float32, where 4 or more tokens cost about 1.5 plain steps, so a chain of two drafted
tokens is kept.
"""

from __future__ import annotations

import torch

from msd.targets import batch_invariant

BFLOAT16_OPTIONS = ("--dtype", "bfloat16", "--depth", "3", "--tree-top-k", "8", "--total-tokens", "16")
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
