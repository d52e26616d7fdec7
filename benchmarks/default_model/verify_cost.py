"""Measure what bounds msd's speedup on this machine: the cost of one target forward over n tokens against one token,
and for each tree setting, where a decoding cycle's time goes and the best speedup the setting could reach.

    python benchmarks/default_model/verify_cost.py --target "$(msd embedded build)" \
        --draft src/msd/embedded/weights/draft --image src/msd/evaluate/local_task/images/chelsea.jpg \
        --output runs/verify-cost.md

Terms. t(n) is the median time of `forward_tree` over n tokens appended to a cache of the prompt plus `--context`
generated tokens. A plain decoding step is t(1). A tree of depth d has N nodes: the root (the last token already
chosen) and N - 1 drafted tokens. One cycle drafts the tree, verifies its N tokens in one target forward and gains at
most d + 1 tokens (d accepted plus the bonus token). The n-gram lookup (`msd.decoding.lookup`) is off here, so that
every cycle verifies N tokens and the numbers describe the draft alone. Hence:

    perfect free draft:   speedup <= (d + 1) * t(1) / t(N)
    this draft, all kept: speedup <= (d + 1) * t(1) / (draft time per cycle + verify time per cycle)
    measured:             speedup  = plain decoding time / msd decoding time, both on the same prompt

The first line needs no draft at all: it is the ceiling this hardware puts on lossless tree verification.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from msd.cli.options import check_exact_trees, tree_argument
from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftModel
from msd.images import load_image
from msd.prompts import build_inputs
from msd.targets import batch_invariant, load_target
from msd.targets.batch_invariant import request_strict_mkl
from msd.targets.base import truncate_cache

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
FLOAT32_TREES = (TreeParams(1, 1, 2), TreeParams(2, 1, 3), TreeParams(3, 1, 4), TreeParams(3, 2, 6), TreeParams(4, 2, 8))
BF16_TREES = (
    TreeParams(2, 1, 3), TreeParams(3, 6, 8), TreeParams(3, 4, 10), TreeParams(3, 6, 12), TreeParams(3, 8, 16)
)


def chain(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the depths (n,) and ancestor mask (n, n) of a chain. Any tree of n nodes costs the same forward."""
    return torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril()


@torch.inference_mode()
def forward_costs(target, inputs, sizes, context: int, repeats: int) -> dict[int, float]:
    """Median seconds of one target forward over n appended tokens, for each n in `sizes`."""
    _, state = target.prefill(inputs)
    generator = torch.Generator().manual_seed(0)
    filler = torch.randint(0, target.vocab_size - 1, (context,), generator=generator)
    target.forward_tree(state, filler, *chain(context))  # grow the cache to a mid-generation length
    base = state.length
    costs = {}
    for n in sizes:
        tokens = torch.randint(0, target.vocab_size - 1, (n,), generator=generator)
        depths, mask = chain(n)
        times = []
        for _ in range(repeats + 1):  # the first call warms up this shape
            started = time.perf_counter()
            target.forward_tree(state, tokens, depths, mask)
            times.append(time.perf_counter() - started)
            truncate_cache(state.cache, base)
            state.length = base
        costs[n] = statistics.median(times[1:])
        logger.info("t(%d) = %.1f ms", n, 1000 * costs[n])
    return costs


@torch.inference_mode()
def cycle_costs(target, draft, inputs, trees, max_new_tokens: int) -> list[dict]:
    """Decode once plainly and once per tree. Returns per-cycle draft and verify time, tau and the measured speedup."""
    plain = SpeculativeGenerator(target, None).generate(inputs, max_new_tokens=max_new_tokens).stats
    rows = []
    for tree in trees:
        tree = replace(tree, lookup_tokens=0)  # see the module docstring
        output = SpeculativeGenerator(target, draft, tree).generate(inputs, max_new_tokens=max_new_tokens)
        stats = output.stats
        rows.append({
            "tree": {"depth": tree.depth, "top_k": tree.top_k, "total_tokens": tree.total_tokens},
            "tau": stats.tau,
            "draft_ms_per_cycle": 1000 * stats.draft_time / stats.target_forwards,
            "verify_ms_per_cycle": 1000 * stats.verify_time / stats.target_forwards,
            "plain_ms_per_step": 1000 * plain.verify_time / plain.target_forwards,
            "speedup": plain.decode_time / stats.decode_time,
        })
        logger.info("%s", rows[-1])
    return rows


def markdown(costs: dict[str, dict[int, float]], cycles: list[dict], context: str) -> str:
    """costs: {dtype: {n: seconds}}; cycles: rows from `cycle_costs`, each with its dtype."""
    sizes = sorted({n for by_size in costs.values() for n in by_size})
    lines = ["## What bounds the speedup here", "", context, "",
             "Cost of one target forward over n tokens, relative to one token (a plain decoding step) in the same dtype:",
             "", "| n | " + " | ".join(str(n) for n in sizes) + " |", "| --- |" + " ---: |" * len(sizes)]
    for dtype, by_size in costs.items():
        cells = [f"{1000 * by_size[n]:.0f}" if n in by_size else "n/a" for n in sizes]
        ratios = [f"{by_size[n] / by_size[1]:.2f}" if n in by_size else "n/a" for n in sizes]
        lines.append(f"| {dtype}, ms | " + " | ".join(cells) + " |")
        lines.append(f"| {dtype}, t(n) / t(1) | " + " | ".join(ratios) + " |")
    lines += ["", "Per dtype and tree setting (depth d, top-k, N tree nodes with the root): time per cycle, measured tau "
              "and speedup, and the two ceilings from the module docstring of `benchmarks/default_model/verify_cost.py`:",
              "", "| dtype | d, top-k, N | draft ms | verify ms | plain step ms | tau | measured speedup | "
              "ceiling, this draft | ceiling, free perfect draft |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in cycles:
        tree = row["tree"]
        gained = tree["depth"] + 1
        by_size = costs[row["dtype"]]
        verify = by_size.get(tree["total_tokens"])
        free = f"{gained * by_size[1] / verify:.2f}x" if verify else "n/a"
        with_draft = gained * row["plain_ms_per_step"] / (row["draft_ms_per_cycle"] + row["verify_ms_per_cycle"])
        lines.append(
            f"| {row['dtype']} | {tree['depth']}, {tree['top_k']}, {tree['total_tokens']} | "
            f"{row['draft_ms_per_cycle']:.0f} | {row['verify_ms_per_cycle']:.0f} | {row['plain_ms_per_step']:.0f} | "
            f"{row['tau']:.2f} | {row['speedup']:.2f}x | {with_draft:.2f}x | {free} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    request_strict_mkl()  # this script may multiply in float32 before it loads a bfloat16 target
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="target folder")
    parser.add_argument("--draft", required=True, help="draft folder")
    parser.add_argument("--image", required=True, help="image of the prompt")
    parser.add_argument("--prompt", default="Describe this picture in a few sentences.")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="forward sizes n, comma-separated")
    parser.add_argument("--context", type=int, default=48, help="tokens appended after the prompt before timing")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per size (default 7)")
    parser.add_argument("--trees", nargs="+", type=tree_argument, default=list(FLOAT32_TREES),
                        help="float32 tree settings as depth,top_k,total_tokens")
    parser.add_argument("--bf16-trees", nargs="+", type=tree_argument, default=list(BF16_TREES),
                        help=f"bfloat16 tree settings, at most {batch_invariant.ROWS} tokens; measured only on CPUs "
                             "with native bfloat16 support")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--output", type=Path, required=True, help="Markdown file to write (JSON next to it)")
    args = parser.parse_args()
    check_exact_trees(parser, args.bf16_trees, "--bf16-trees")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    runs = {"float32": args.trees}
    if batch_invariant.supported():
        runs["bfloat16"] = args.bf16_trees
    costs, cycles = {}, []
    for dtype, trees in runs.items():
        target = load_target(args.target, dtype=dtype, device="cpu")
        draft = DraftModel.from_pretrained(args.draft)
        inputs = build_inputs(target.processor, args.prompt, [load_image(args.image)])
        sizes = sorted({1, *(int(size) for size in args.sizes.split(","))} | {tree.total_tokens for tree in trees})
        costs[dtype] = forward_costs(target, inputs, sizes, args.context, args.repeats)
        cycles += [{"dtype": dtype, **row} for row in cycle_costs(target, draft, inputs, trees, args.max_new_tokens)]
        del target, draft

    prompt_length = int(inputs["input_ids"].shape[1])
    context = (f"Measured by `benchmarks/default_model/verify_cost.py` on {Path(args.image).name} with "
               f"\"{args.prompt}\": a {prompt_length}-token prompt plus {args.context} tokens in the cache, "
               f"{torch.get_num_threads()} torch threads, median of {args.repeats} forwards per size; "
               f"{args.max_new_tokens} new tokens per decoding run. float32 uses the linear layers "
               "`cpu_linear_rows=\"auto\"` picks at load (`msd.targets.cpu_linear`), bfloat16 msd's batch-invariant ones "
               "(`msd.targets.batch_invariant`).")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(  # the measurements first, so they survive any formatting error
        json.dumps({"forward_seconds": costs, "cycles": cycles, "context": context}, indent=2) + "\n"
    )
    args.output.write_text(markdown(costs, cycles, context))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
