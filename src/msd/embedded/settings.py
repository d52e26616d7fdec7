"""Decoding settings of the default model for the CPU msd runs on, chosen from measured costs (BENCHMARKS.md).

On a CPU with native bfloat16 support (AMX), the target runs in bfloat16 with msd's batch-invariant kernels. There a
forward over 8 tokens cost 1.13 unpadded one-token forwards, one over 12 tokens 1.26 and one over 16 tokens 1.36
in one run, and 1.28, 1.42 and 1.52 in a noisier one (`msd.targets.batch_invariant`). The tree was chosen with
`benchmarks/default_draft/measure.py` on the four validation questions of
`benchmarks/default_draft/tree_validation.jsonl` and three matplotlib sample pictures (2-core Emerald Rapids Xeon, the
draft before its finishing stage). Mean speedups over plain decoding: 1.84x and 1.86x in two runs for depth 3 with 6 children per node
and 12 tokens, 1.86x for depth 3 with 4 children and 12 tokens, 1.75x and 1.80x for depth 3 with 8 children and 16
tokens (tau 2.90 against 2.85, which does not pay for the larger forward), 1.80x at depth 4 with 12 tokens, 1.74x
for depth 3 with 8 children and 12 tokens, 1.76x for 10 tokens, and 1.66-1.73x for 8-token trees.

Elsewhere the target runs in float32, where 4 or more tokens cost about 1.5 plain steps, so a chain of two drafted
tokens is kept.
"""

from __future__ import annotations

import torch

from msd.targets import batch_invariant

BFLOAT16_OPTIONS = ("--dtype", "bfloat16", "--depth", "3", "--tree-top-k", "6", "--total-tokens", "12")
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
