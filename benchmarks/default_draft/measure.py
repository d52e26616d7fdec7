"""Measure a draft against plain greedy decoding for several tree settings, in one process, the way `msd generate
--compare` does per call: tau, tokens/s, speedup (plain total time / msd total time) and token identity.

    python benchmarks/default_draft/measure.py --target "$(msd embedded build)" \
        --draft src/msd/embedded/weights/draft --held-out benchmarks/default_draft/tree_validation.jsonl \
        --text-prompts 4 --trees 3,1,4 4,1,5 3,2,6

Each input is decoded plainly once and then with every tree. Prints a Markdown table; --json also writes the rows.
`tree_validation.jsonl` contains four instruction prompts on topics that neither the training rows nor the benchmark
use, for choosing a tree and comparing training settings without looking at the benchmark. The tau values do not
depend on the machine's load, but the speedups do.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from msd.cli.options import check_exact_trees, tree_argument
from msd.data.rows import JsonlRows
from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftModel
from msd.images import load_image
from msd.prompts import build_inputs
from msd.targets import batch_invariant, load_target
from msd.targets.batch_invariant import request_strict_mkl

logger = logging.getLogger(__name__)

IMAGE_PROMPT = "Describe this picture in a few sentences."


def held_out_prompts(path: Path, count: int) -> list[str]:
    rows = JsonlRows(path)
    return [rows[index]["conversations"][0]["value"] for index in range(min(count, len(rows)))]


def measure(target, draft, cases, trees, max_new_tokens: int) -> list[dict]:
    """Decode every (name, inputs) case plainly once and with each tree; return one result row per pair."""
    results = []
    plain_generator = SpeculativeGenerator(target, None)
    for name, inputs in cases:
        plain = plain_generator.generate(inputs, max_new_tokens=max_new_tokens)
        for tree in trees:
            output = SpeculativeGenerator(target, draft, tree).generate(inputs, max_new_tokens=max_new_tokens)
            stats = output.stats
            results.append({
                "input": name,
                "tree": f"{tree.depth},{tree.top_k},{tree.total_tokens}",
                "lookup_tokens": tree.lookup_tokens,
                "tau": stats.tau,
                "msd_tokens_per_s": stats.tokens_per_second,
                "plain_tokens_per_s": plain.stats.tokens_per_second,
                "speedup": plain.stats.total_time / stats.total_time,
                "identical": output.token_ids == plain.token_ids,
                "new_tokens": stats.new_tokens,
                "draft_s": stats.draft_time,
                "verify_s": stats.verify_time,
                "prefill_s": stats.prefill_time,
            })
            logger.info("%s", results[-1])
    return results


def print_table(results: list[dict]) -> None:
    print(
        "| input | depth,top-k,total | lookup | tau | msd tok/s | plain tok/s | speedup | identical | draft s | verify s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['input']} | {row['tree']} | {row['lookup_tokens']} | {row['tau']:.2f} | "
            f"{row['msd_tokens_per_s']:.1f} | {row['plain_tokens_per_s']:.1f} | {row['speedup']:.2f}x | {'yes' if row['identical'] else 'NO'} | "
            f"{row['draft_s']:.2f} | {row['verify_s']:.2f} |"
        )


def main() -> None:
    request_strict_mkl()  # this script may multiply in float32 before it loads a bfloat16 target
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="target folder")
    parser.add_argument("--draft", required=True, help="draft folder")
    parser.add_argument("--image", action="append", default=[], help="an image to describe (repeatable)")
    parser.add_argument("--held-out", type=Path, help="JSONL rows whose first human messages are text prompts")
    parser.add_argument("--text-prompts", type=int, default=3, help="held-out text prompts to use (default 3)")
    parser.add_argument("--trees", nargs="+", type=tree_argument, default=[TreeParams(4, 3, 10)],
                        help="tree settings as depth,top_k,total_tokens (default 4,3,10)")
    parser.add_argument("--lookup-tokens", nargs="+", type=int, default=[TreeParams.lookup_tokens],
                        help="n-gram lookup tokens per cycle to try with every tree; 0 turns the lookup off "
                        f"(default {TreeParams.lookup_tokens})")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the target and the draft (default float32)")
    parser.add_argument("--json", type=Path, help="also write the result rows to this JSON file")
    args = parser.parse_args()
    if not args.image and not args.held_out:
        parser.error("pass at least one --image or --held-out")
    if args.dtype == "bfloat16" and batch_invariant.supported():  # elsewhere bfloat16 runs PyTorch's kernels
        check_exact_trees(parser, args.trees, "--trees")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    target = load_target(args.target, dtype=args.dtype, device="cpu")
    draft = DraftModel.from_pretrained(args.draft, dtype=getattr(torch, args.dtype))
    cases = [(Path(path).stem, build_inputs(target.processor, IMAGE_PROMPT, [load_image(path)])) for path in args.image]
    if args.held_out:
        for index, prompt in enumerate(held_out_prompts(args.held_out, args.text_prompts)):
            cases.append((f"text{index}", build_inputs(target.processor, prompt, [])))
    with torch.inference_mode():
        SpeculativeGenerator(target, None).generate(cases[0][1], max_new_tokens=4)  # warm-up
        trees = [replace(tree, lookup_tokens=count) for tree in args.trees for count in args.lookup_tokens]
        results = measure(target, draft, cases, trees, args.max_new_tokens)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
