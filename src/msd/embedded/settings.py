"""Decoding settings of the default model for the CPU msd runs on, chosen from measured costs (BENCHMARKS.md).

On a CPU with native bfloat16 support (AMX), the target runs in bfloat16 with msd's batch-invariant kernels, where a
forward over 16 tokens costs about 1.3 plain steps, so a tree of 16 tokens pays. On the four validation questions of
`benchmarks/default_draft/tree_validation.jsonl` (2-core Emerald Rapids Xeon), depth 4 with 4 children per node gave
1.62x on average, against 1.58x for depth 5 and 1.47x for depth 2 with 3 tokens. Elsewhere the target runs in float32,
where 4 or more tokens cost 1.5 plain steps or more, so a chain of two drafted tokens is kept.
"""

from __future__ import annotations

from msd.targets import batch_invariant

BFLOAT16_OPTIONS = ("--dtype", "bfloat16", "--depth", "4", "--tree-top-k", "4", "--total-tokens", "16")
FLOAT32_OPTIONS = ("--dtype", "float32", "--depth", "2", "--tree-top-k", "1", "--total-tokens", "3")


def decoding_options() -> tuple[str, ...]:
    """`msd generate`/`msd bench` options (dtype and tree) for the default model on this machine's CPU."""
    return BFLOAT16_OPTIONS if batch_invariant.supported() else FLOAT32_OPTIONS
