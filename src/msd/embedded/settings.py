"""Decoding settings of the default model for the CPU msd runs on, chosen from measured costs (BENCHMARKS.md).

On a CPU with AMX tiles, the target runs in bfloat16 with msd's batch-invariant kernels. There a forward over 8 tokens
cost 1.13 unpadded one-token forwards, one over 12 tokens 1.26 and one over 16 tokens 1.36 in one run, and 1.28, 1.42
and 1.52 in a noisier one (`msd.targets.batch_invariant`). The tree was chosen with
`benchmarks/default_draft/measure.py` on the four validation questions of
`benchmarks/default_draft/tree_validation.jsonl` and three matplotlib sample pictures (2-core Emerald Rapids Xeon, the
draft before its finishing stage). Mean speedups over plain decoding: 1.84x and 1.86x in two runs for depth 3 with 6
children per node and 12 tokens, 1.86x for depth 3 with 4 children and 12 tokens, 1.75x and 1.80x for depth 3 with 8
children and 16 tokens (tau 2.90 against 2.85, which does not pay for the larger forward), 1.80x at depth 4 with 12
tokens, 1.74x for depth 3 with 8 children and 12 tokens, 1.76x for 10 tokens, and 1.66-1.73x for 8-token trees.

On a CPU with AVX-512 BF16 but no AMX (2-core Zen 4 EPYC) bfloat16 is also the faster choice: plain decoding ran at
27.5 tokens/s against 16.1 in float32, and msd at 40.3 tokens/s (the AMX tree) against 27.2 with float32's 3-token chain
(`msd bench` on the benchmark prompts). A forward over 8 tokens cost 1.26 one-token forwards there, 12 tokens 1.46 and
16 tokens 1.66. On the validation prompts above, depth 3 with 4 children and 10 tokens and depth 3 with 6 children and
8 tokens reached 1.63x, against 1.58x for the AMX tree and 1.49x for 16 tokens.

Without native bfloat16, including AVX-512 CPUs where oneDNN only emulates it, the target runs in float32, where 4 or
more tokens cost about 1.5 plain steps (measured on the Xeon), so a chain of two drafted tokens is kept.
"""

from __future__ import annotations

import torch

from msd.targets import batch_invariant

BFLOAT16_OPTIONS = ("--dtype", "bfloat16", "--depth", "3", "--tree-top-k", "6", "--total-tokens", "12")
NO_AMX_BFLOAT16_OPTIONS = ("--dtype", "bfloat16", "--depth", "3", "--tree-top-k", "4", "--total-tokens", "10")
FLOAT32_OPTIONS = ("--dtype", "float32", "--depth", "2", "--tree-top-k", "1", "--total-tokens", "3")


def has_amx() -> bool:
    """True when this CPU has AMX tiles, where the first bfloat16 cost curve above was measured."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def has_native_bfloat16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AMX or AVX-512 BF16).

    oneDNN also runs bfloat16 on plain AVX-512 by emulation, which `batch_invariant.supported` accepts. There a
    12-row product took about twice float32's time in one measurement (oneDNN limited to plain AVX-512 on Zen 4).
    """
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return has_amx() or bool(probe and probe())


def decoding_options() -> tuple[str, ...]:
    """Return the `msd generate`/`msd bench` options (dtype and tree) for the default model on this machine's CPU.

    CPUs with native bfloat16 run it in bfloat16, with the tree measured on AMX or the one measured on AVX-512 BF16
    alone. Other CPUs get float32.
    """
    if not (batch_invariant.supported() and has_native_bfloat16()):
        return FLOAT32_OPTIONS
    return BFLOAT16_OPTIONS if has_amx() else NO_AMX_BFLOAT16_OPTIONS
