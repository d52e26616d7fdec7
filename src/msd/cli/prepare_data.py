"""`msd prepare-data`: run the target over LLaVA-format conversations and store the features a draft trains on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msd.cli.options import DTYPES
from msd.errors import MSDError

DESCRIPTION = """\
Run the target over instruction data with teacher forcing and store, per sample, the token ids, the target's
last-layer hidden states, the projected visual embeddings, the visual-position and assistant-turn masks and (for
Qwen2-VL) the 3-D positions, as safetensors shards with a JSONL manifest and a dataset card.

Rows are LLaVA-format: {"id", "image" (optional path or list of paths under --image-root), "conversations":
[{"from": "human"|"gpt", "value": "...<image>..."}]}. Text-only and multimodal sets are separate runs, named by
--kind, so that training can take the text set first and then mix in the multimodal one.

A killed run resumes when started again with the same options. To split the work, run --shard I/N on N machines,
or start the command with `accelerate launch`, which gives each process its own part.

examples:
  msd prepare-data --target llava-hf/llava-1.5-7b-hf --data ShareGPT_V3_unfiltered_cleaned_split.json \\
      --kind llava_v15_t --output features/llava15-sharegpt
  accelerate launch -m msd prepare-data --target llava-hf/llava-1.5-7b-hf --data llava_v1_5_mix665k.json \\
      --image-root data/ --kind llava_v15_v --dtype float16 --output features/llava15-mix665k
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="store target features of instruction data for draft training",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target", required=True, metavar="PATH", help="target model: a local folder or a Hugging Face model id"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="rows: a .json list, a .jsonl file (one row per line), a folder written by datasets' save_to_disk, "
        "or a Hugging Face datasets id",
    )
    parser.add_argument("--split", default="train", help="split of a datasets source (default train)")
    parser.add_argument(
        "--image-root", metavar="DIR", help="folder that the rows' image paths are relative to (default: as written)"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for shards, manifests and the card")
    parser.add_argument(
        "--kind",
        required=True,
        help="dataset kind: text (first training stage; rows with images are skipped) or vision; the research "
        "names llava_v15_t, qwen2_vl_t (text) and llava_v15_v, qwen2_vl_v (vision) are accepted",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="maximum sample length in tokens, visual tokens included; longer conversations keep their leading whole "
        "turns up to the last answer that fits (default 2048)",
    )
    parser.add_argument(
        "--system-prompt", metavar="TEXT", help="system message put before every conversation (default: none)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="target weight dtype; auto keeps the checkpoint's (default auto)",
    )
    parser.add_argument(
        "--store-dtype",
        choices=("bfloat16", "float16"),
        default="bfloat16",
        help="dtype of the stored hidden states and visual embeddings, 2 bytes per value (default bfloat16)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device, e.g. cpu or cuda:0; auto takes the accelerate process's device, else cuda when "
        "available, else cpu (default auto)",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="process part I of N (0-based): the rows whose index past --start is I modulo N. Under accelerate "
        "launch each process takes a further part of it (default: all rows, or one part per accelerate process)",
    )
    parser.add_argument("--start", type=int, default=0, help="first row to process, 0-based (default 0)")
    parser.add_argument("--limit", type=int, help="process at most this many rows from --start (default: all)")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=128,
        help="samples per safetensors file (with --regenerate up to --regenerate-batch-size - 1 more, so that a shard "
        "ends with a batch); a killed run redoes at most one shard's samples per part (default 128)",
    )
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="replace each answer with the target's own greedy answer before recording (self-distillation)",
    )
    parser.add_argument(
        "--regenerate-max-tokens",
        type=int,
        default=512,
        help="maximum regenerated answer length in tokens (default 512)",
    )
    parser.add_argument(
        "--regenerate-batch-size",
        type=int,
        default=16,
        metavar="ROWS",
        help="prompts answered per generate call with --regenerate, left-padded to one length (default 16)",
    )
    parser.add_argument(
        "--log-skipped",
        type=int,
        default=5,
        metavar="COUNT",
        help="log the first COUNT skipped rows of each reason; all are counted in the summary (default 5)",
    )
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from msd.data.prepare import PrepareSettings, format_bytes, prepare_features
    from msd.data.rows import Part, open_rows
    from msd.data.storage import compare_card
    from msd.targets import load_target

    # Accelerator reads ACCELERATE_USE_CPU itself, PartialState does not: without it, torchrun's processes on a machine
    # without GPUs would each take the whole data instead of a part.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    part = Part.parse(arguments.shard) if arguments.shard else Part()
    if state.num_processes > 1:
        part = part.split(state.process_index, state.num_processes)
    device = arguments.device
    if device == "auto":
        device = state.device

    settings = PrepareSettings(  # checks every value that needs no target, before anything loads
        output=Path(arguments.output),
        kind=arguments.kind,
        max_length=arguments.max_length,
        store_dtype=arguments.store_dtype,
        image_root=Path(arguments.image_root) if arguments.image_root else None,
        system_prompt=arguments.system_prompt,
        start=arguments.start,
        limit=arguments.limit,
        part=part,
        shard_size=arguments.shard_size,
        regenerate=arguments.regenerate,
        regenerate_max_tokens=arguments.regenerate_max_tokens,
        regenerate_batch_size=arguments.regenerate_batch_size,
        logged_skips=arguments.log_skipped,
    )
    rows = open_rows(arguments.data, arguments.split)
    compare_card(settings.output, settings.option_settings(str(arguments.data)))  # before a large target loads
    target = load_target(arguments.target, dtype=arguments.dtype, device=device)
    summary = prepare_features(target, rows, settings, source=str(arguments.data))

    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(summary.skipped.items())) or "none"
    projected = format_bytes(summary.projected_bytes) if summary.projected_bytes is not None else "unknown"
    print(
        f"[{part.name}] stored {summary.stored} samples; skipped rows: {skipped}; "
        f"folder size {format_bytes(summary.size_bytes)} (projected before the run: {projected})",
        file=sys.stderr,
    )
    stored = summary.stored
    if state.num_processes > 1:
        state.wait_for_everyone()
        if not state.is_main_process:
            return 0
        from msd.data.storage import update_card

        stored = update_card(settings.output)["counts"]["samples"]  # every process's part counts
    if summary.skipped and not stored:
        raise MSDError(
            f"no sample was stored: every row was skipped ({skipped}; the warnings above name the first rows of each "
            "reason). Fix the cause, then write to a new --output."
        )
    return 0
