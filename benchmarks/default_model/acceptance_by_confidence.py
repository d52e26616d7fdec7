"""Where the draft's first token is rejected: first-token acceptance against the target's confidence.

    python benchmarks/default_model/acceptance_by_confidence.py --target "$(msd embedded build)" \
        --draft src/msd/embedded/weights/draft --prompts benchmarks/default_model/eval_prompts.jsonl \
        --output runs/acceptance-by-confidence.md

Each prompt is decoded with the draft (greedy, by default a chain of depth 2; --tree sets another). In every cycle the
target's forward scores the root first. The softmax of that row gives the target's probability of the token it
chooses next: its confidence. The first drafted token is accepted exactly when it equals that token. Cycles are
grouped by confidence, and each group reports its share of cycles, how often the first drafted token was kept and how
often the target's token lies outside a reduced draft vocabulary, where no draft proposal can match it. The n-gram
lookup (`msd.decoding.lookup`) is off, so every proposal is the draft's.

A low-confidence position is one where the target's top two tokens are close. The draft has to guess which of them a
30-layer model ends up preferring from its last-layer feature one step earlier, which is where a small draft fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from msd.cli.options import tree_argument
from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftModel
from msd.errors import MSDError
from msd.evaluate.samples import load_llava_file
from msd.prompts import build_inputs
from msd.targets import load_target
from msd.targets.batch_invariant import request_strict_mkl

logger = logging.getLogger(__name__)

BUCKETS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)


def record_root_choice(target, choices: list[tuple[float, int]]) -> None:
    """Make `target.forward_tree` append (confidence, token) of the target's own next token at the tree root."""
    forward_tree = target.forward_tree

    def recording(state, tokens, depths, ancestor_mask):
        logits, hidden = forward_tree(state, tokens, depths, ancestor_mask)
        probabilities = torch.softmax(logits[0].float(), dim=-1)
        choices.append((float(probabilities.max()), int(probabilities.argmax())))
        return logits, hidden

    target.forward_tree = recording


@torch.inference_mode()
def measure(target, draft, samples, tree: TreeParams, max_new_tokens: int) -> list[dict]:
    """Decode each sample (as `msd bench` builds its inputs) with the draft and return one entry per cycle: the task, the target's confidence at the root,
    whether its token is in the draft vocabulary and the accepted length."""
    choices: list[tuple[float, int]] = []
    record_root_choice(target, choices)
    vocabulary = None if draft.draft_to_target is None else set(draft.draft_to_target.tolist())
    cycles = []
    tree = replace(tree, lookup_tokens=0)  # the draft's own proposals only
    for sample in samples:
        choices.clear()
        output = SpeculativeGenerator(target, draft, tree).generate(
            build_inputs(target.processor, sample.prompt, sample.images),
            max_new_tokens=max_new_tokens,
            stop_strings=sample.stop_strings,
        )
        for (confidence, token), accepted in zip(choices, output.stats.accepted_lengths):
            cycles.append({
                "task": sample.task,
                "confidence": confidence,
                "in_draft_vocab": vocabulary is None or token in vocabulary,
                "accepted": accepted,
            })
        logger.info("%s: tau %.2f over %d cycles", sample.sample_id, output.stats.tau, len(choices))
    return cycles


def summarize(cycles: list[dict]) -> list[dict]:
    """Per confidence bucket: share of cycles, first-token acceptance and mean accepted length."""
    rows = []
    for low, high in zip(BUCKETS, BUCKETS[1:]):
        inside = [c for c in cycles if low <= c["confidence"] < high or (high == 1.0 and c["confidence"] == 1.0)]
        if not inside:
            continue
        rows.append({
            "bucket": f"{low:.1f}-{high:.1f}",
            "share": len(inside) / len(cycles),
            "first_accepted": sum(c["accepted"] >= 1 for c in inside) / len(inside),
            "outside_vocab": sum(not c["in_draft_vocab"] for c in inside) / len(inside),
            "mean_accepted": sum(c["accepted"] for c in inside) / len(inside),
        })
    return rows


def markdown(cycles: list[dict], context: str) -> str:
    lines = ["## First-token acceptance by target confidence", "", context, "",
             "| target confidence | share of cycles | first drafted token kept | target token outside draft vocabulary "
             "| drafted tokens kept per cycle |",
             "| --- | ---: | ---: | ---: | ---: |"]
    everything = {"bucket": "all", "share": 1.0,
                  "first_accepted": sum(c["accepted"] >= 1 for c in cycles) / len(cycles),
                  "outside_vocab": sum(not c["in_draft_vocab"] for c in cycles) / len(cycles),
                  "mean_accepted": sum(c["accepted"] for c in cycles) / len(cycles)}
    for row in summarize(cycles) + [everything]:
        lines.append(f"| {row['bucket']} | {row['share']:.0%} | {row['first_accepted']:.0%} | "
                     f"{row['outside_vocab']:.0%} | {row['mean_accepted']:.2f} |")
    return "\n".join(lines) + "\n"


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    request_strict_mkl()  # this script may multiply in float32 before it loads a bfloat16 target
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="target folder")
    parser.add_argument("--draft", required=True, help="draft folder")
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL rows as in eval_prompts.jsonl")
    parser.add_argument("--image-root", type=Path, help="folder of the rows' images (default: msd's local task images)")
    parser.add_argument("--tree", type=tree_argument, default=TreeParams(2, 1, 3),
                        help="draft tree as depth,top_k,total_tokens (default 2,1,3: a chain of two drafted tokens)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=96, help="maximum new tokens per answer (default 96)")
    parser.add_argument("--output", type=Path, required=True, help="Markdown file to write (JSON next to it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    image_root = args.image_root or Path(__file__).resolve().parents[2] / "src/msd/evaluate/local_task/images"
    try:
        samples = load_llava_file(args.prompts, image_root)  # before the models load, so a bad file fails at once
        if not samples:
            raise MSDError(f"no prompts in {args.prompts}")
        target = load_target(args.target, dtype="float32", device="cpu")
        draft = DraftModel.from_pretrained(args.draft)
        cycles = measure(target, draft, samples, args.tree, args.max_new_tokens)
    except MSDError as error:
        sys.exit(f"error: {error}")

    context = (f"Measured by `benchmarks/default_model/acceptance_by_confidence.py` on {len(samples)} prompts of "
               f"{args.prompts.name}, {len(cycles)} decoding cycles, tree {args.tree.depth},{args.tree.top_k},"
               f"{args.tree.total_tokens}, {args.max_new_tokens} new tokens at most. Target confidence: the target's "
               "probability of the token it chooses after the tree root.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown(cycles, context))
    args.output.with_suffix(".json").write_text(json.dumps({"context": context, "cycles": cycles}, indent=2) + "\n")
    print(args.output.read_text())


if __name__ == "__main__":
    main()
