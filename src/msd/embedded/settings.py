"""Decoding settings of the default model for the CPU msd runs on, chosen from measured costs (BENCHMARKS.md).

On a CPU with native bfloat16 (AMX tiles or AVX-512 BF16 instructions) the target runs in bfloat16 with msd's
batch-invariant kernels (`msd.targets.batch_invariant`), and the tree has depth 3, 4 children per node and 10 tokens.
It was chosen with `benchmarks/default_draft/measure.py` on the four validation questions of
`benchmarks/default_draft/tree_validation.jsonl` and three matplotlib sample pictures, none of them in the training
rows or the benchmark. Mean speedups over plain decoding on those seven prompts:

- 2-core Xeon with AMX, two runs: 1.84x and 1.87x for this tree, 1.87x and 1.88x with 5 children (within the spread
  between runs), 1.81x twice with 6 children and 12 tokens, 1.81x at depth 4 with 12 tokens, 1.81x with 8 children
  and 16 tokens, 1.77x at depth 4 with 16 tokens, 1.73x and 1.75x for 8 tokens. In the cost table of BENCHMARKS.md
  (`benchmarks/default_model/verify_cost.py`) a forward over 10 tokens cost 1.17 one-token forwards there, 12 tokens
  1.22 and 16 tokens 1.31. Later, with the n-gram lookup and cheaper drafting, this tree measured 1.98x and 2.00x, 9
  tokens 2.00x and 2.01x (the same tau), and depth 4 with 10 tokens 1.90x.
- 2-core Zen 4 EPYC with AVX-512 BF16 and no AMX: 1.63x for this tree and for 6 children with 8 tokens, 1.58x with 6
  children and 12 tokens, 1.49x for 16 tokens. Plain decoding ran at 27.5 tokens/s in bfloat16 against 16.1 in
  float32 there, and msd at 40.3 tokens/s in bfloat16 against 27.2 with float32's 3-token chain. Later, with the
  lookup, cheaper drafting and float32's padded single row, the benchmark prompts ran at 40.8 tokens/s with msd in
  bfloat16 (1.66x) against 29.4 in float32 (1.23x), and trees of 6 to 12 tokens measured within the spread of this
  one.

Without native bfloat16, including AVX-512 CPUs where oneDNN only emulates it, the target runs in float32, where 4 or
more tokens cost about 1.5 plain steps (measured on the Xeon), so a chain of two drafted tokens is kept.
"""

from __future__ import annotations

import torch

from msd.targets import batch_invariant

BFLOAT16_OPTIONS = ("--dtype", "bfloat16", "--depth", "3", "--tree-top-k", "4", "--total-tokens", "10")
FLOAT32_OPTIONS = ("--dtype", "float32", "--depth", "2", "--tree-top-k", "1", "--total-tokens", "3")


def has_amx() -> bool:
    """True when this CPU has AMX tiles."""
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

    CPUs with native bfloat16 run it in bfloat16 with a 10-token tree, other CPUs in float32 with a 3-token chain.
    """
    if not (batch_invariant.supported() and has_native_bfloat16()):
        return FLOAT32_OPTIONS
    return BFLOAT16_OPTIONS
