"""`msd bench`: tau and wall-clock speedup of decoding methods, side by side, with an output-identity check."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from msd.cli.options import add_model_options, add_tree_options, check_device, fit_default_tree, tree_from
from msd.errors import MSDError

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Measure decoding methods on an evaluation set: for each sample, plain decoding and every requested method decode the
same inputs in the same process, batch 1, greedily, after a warm-up, in rotating order. Each method first decodes
two tokens of each sample untimed, so no timed run pays for building the kernels of a new prompt length.

Methods: plain (the target alone in msd's loop, the baseline), generate (the target alone through transformers'
`generate`, to check that the baseline is not slower than transformers), msd (--draft), eagle (--eagle-draft: a draft
that does not decouple visual tokens, for the ablation), prompt-lookup (transformers' prompt-lookup decoding) and assisted (transformers'
assisted generation with --assistant). transformers' methods are timed end to end only; a method transformers cannot
run on the target is skipped and listed in the report.

The report (report.json, report.md and, with matplotlib, plots) gives per task and overall:
  tau              tokens per target forward during decoding, bonus token included (plain decoding: 1)
  tokens/s         new tokens / end-to-end time
  speedup e2e      plain time / method time, prefill included: mean +- std of per-sample ratios, and ratio of totals
  speedup decode   the same without the prefill (prompt and image encoding plus the first token)
  mean tokens      mean output length
  identical        share of samples whose output equals plain decoding's; must be 100% (the run exits with 1 if not)

Evaluation sets: `local` (real photos shipped with msd, with questions and captions), a LLaVA-format .json/.jsonl
file (optional per-row `task` and `stop` fields), or a `datasets` folder written by save_to_disk.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure tau and speedup of decoding methods against plain decoding",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser)
    parser.add_argument("--eagle-draft", metavar="PATH", help="draft folder with decouple_visual=false, for eagle")
    parser.add_argument("--assistant", metavar="PATH", help="small model of the target's family, for assisted")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods besides plain (default: msd if --draft, eagle if --eagle-draft, assisted if "
        "--assistant, and prompt-lookup)",
    )
    parser.add_argument("--data", default="local", help="evaluation set: local, a .json/.jsonl file or a dataset "
                        "folder (default local)")
    parser.add_argument("--image-folder", metavar="DIR", help="folder that JSON image paths are relative to "
                        "(default: the JSON file's folder)")
    parser.add_argument("--split", default="test", help="split of a dataset folder (default test)")
    parser.add_argument("--limit", type=int, metavar="N", help="measure only the first N samples")
    parser.add_argument("--max-new-tokens", type=int, help="maximum new tokens per sample (default 256; 512 with "
                        "--research-convention)")
    parser.add_argument("--stop", action="append", metavar="TEXT", help="stop string replacing every sample's own; "
                        "repeatable")
    parser.add_argument(
        "--research-convention",
        action="store_true",
        help="generate exactly --max-new-tokens tokens (default 512) per sample, ignoring stop strings and "
        "end-of-sequence tokens: the protocol of published MSD speedups",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each method on the first sample before "
                        "measuring (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each method per sample, in rounds of all "
                        "methods; the run with the median time is reported (default 1). Use 3 or more on a machine "
                        "whose speed varies")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="candidate tokens per step of "
                        "transformers' prompt-lookup method (default 10). --lookup-tokens sets msd's own lookup")
    add_tree_options(parser)
    parser.add_argument(
        "--tune-tree",
        action="store_true",
        help="choose --total-tokens and --depth for this machine by timing the target's forward at several tree "
        "sizes and the draft's proposals (needs --draft); the choice is logged and written to the report",
    )
    parser.add_argument("--tune-sizes", help="tree sizes tried by --tune-tree, comma-separated, lookup tokens "
                        "excluded (default 16,32,48,64, and 6,8,10,12 on a bfloat16 CPU target with batch-invariant "
                        "kernels, which verify at most 16 tokens; on CPUs in float32 try 2,3,4,6)")
    parser.add_argument("--tune-depths", default="3,5,7", help="depths tried by --tune-tree, comma-separated "
                        "(default 3,5,7)")
    parser.add_argument("--tune-pilot-tokens", type=int, default=64, help="tokens each --tune-tree pilot generates "
                        "to measure tau (default 64)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for report.json, report.md and plots")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    import torch
    import transformers

    from msd.draft import DraftModel
    from msd.evaluate.bench import RESEARCH_FORCED_TOKENS, BenchSettings, processor_inputs, run_bench
    from msd.evaluate.method_setup import build_methods, drop_unsupported
    from msd.evaluate.report import all_identical, markdown_table, summarize, write_report
    from msd.evaluate.samples import load_samples
    from msd.evaluate.tree_tuning import tune_tree
    from msd.targets import load_target

    default_tokens = RESEARCH_FORCED_TOKENS if arguments.research_convention else 256
    settings = BenchSettings(
        max_new_tokens=arguments.max_new_tokens or default_tokens,
        research_convention=arguments.research_convention,
        stop_strings=tuple(arguments.stop) if arguments.stop else None,
        warmup=arguments.warmup,
        repeats=arguments.repeats,
    )
    if arguments.limit is not None and arguments.limit < 1:
        raise MSDError(f"--limit must be at least 1, got {arguments.limit}")
    if arguments.prompt_lookup_tokens < 1:
        raise MSDError(f"--prompt-lookup-tokens must be at least 1, got {arguments.prompt_lookup_tokens}")
    output = Path(arguments.output)
    if output.exists() and not output.is_dir():  # checked before hours of decoding, not when writing the report
        raise MSDError(f"--output {output} is a file. Pass a folder for report.json, report.md and the plots.")
    check_device(arguments.device)
    names = method_names(arguments)
    if arguments.tune_tree and not arguments.draft:
        raise MSDError("--tune-tree times the MSD draft: pass --draft.")
    if arguments.tune_pilot_tokens < 2:
        raise MSDError(f"--tune-pilot-tokens must be at least 2, got {arguments.tune_pilot_tokens}")
    tune_sizes = parse_sizes(arguments.tune_sizes, "--tune-sizes") if arguments.tune_sizes else None
    tune_depths = parse_sizes(arguments.tune_depths, "--tune-depths")
    tree = tree_from(arguments)
    samples = load_samples(arguments.data, arguments.image_folder, arguments.split, arguments.limit)

    drafts = {  # loaded before the target, so a wrong draft path fails fast
        "msd": DraftModel.from_pretrained(arguments.draft) if arguments.draft else None,
        "eagle": DraftModel.from_pretrained(arguments.eagle_draft) if arguments.eagle_draft else None,
    }
    target = load_target(
        arguments.target, dtype=arguments.dtype, device=arguments.device, cpu_linear_rows=arguments.cpu_linear_rows
    )
    tree = fit_default_tree(tree, target, arguments)
    assistant = None
    if arguments.assistant:
        assistant = load_target(arguments.assistant, dtype=arguments.dtype, device=arguments.device).model
    build = processor_inputs(target.processor)

    tuning = None
    if arguments.tune_tree:
        tuning = tune_tree(
            target, drafts["msd"], build(samples[0]), tree, tune_sizes, tune_depths,
            pilot_tokens=arguments.tune_pilot_tokens,
        )
        tree = tuning.params
        print(f"tree chosen for this machine: --total-tokens {tree.total_tokens} --depth {tree.depth}", file=sys.stderr)

    methods = build_methods(target, names, tree, drafts, assistant, arguments.prompt_lookup_tokens)
    methods, skipped = drop_unsupported(methods, build(samples[0]), requested=bool(arguments.methods))
    tokenizer = getattr(target.processor, "tokenizer", target.processor)
    records = run_bench(methods, samples, settings, build, tokenizer, progress=not arguments.no_progress)

    summary = summarize(records)
    context = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": arguments.target,
        "draft": arguments.draft,
        "eagle_draft": arguments.eagle_draft,
        "assistant": arguments.assistant,
        "data": arguments.data,
        "samples": len(samples),
        "device": device_name(target.device),
        "dtype": str(target.dtype),
        "machine": f"{platform.machine()}, {processor_name()}, {torch.get_num_threads()} threads",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "max_new_tokens": settings.max_new_tokens,
        "research_convention": settings.research_convention,
        "tree": f"total_tokens={tree.total_tokens} depth={tree.depth} top_k={tree.top_k} "
        f"lookup_tokens={tree.lookup_tokens}",
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "skipped_methods": skipped,
        "tree_tuning": tuning.as_dict() if tuning else None,
    }
    written = write_report(Path(arguments.output), records, summary, context)
    print(markdown_table(summary), end="")
    print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    if not all_identical(summary):
        print("error: some outputs differ from plain decoding; see report.md", file=sys.stderr)
        return 1
    return 0


def method_names(arguments: argparse.Namespace) -> list[str]:
    if arguments.methods:
        names = [name.strip() for name in arguments.methods.split(",") if name.strip()]
    else:
        names = ["prompt-lookup"]
        names += ["msd"] if arguments.draft else []
        names += ["eagle"] if arguments.eagle_draft else []
        names += ["assisted"] if arguments.assistant else []
    return ["plain", *[name for name in names if name != "plain"]]


def parse_sizes(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MSDError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise MSDError(f"{option} must list positive integers, got {text!r}")
    return values


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def processor_name() -> str:
    """Return the CPU model, from /proc/cpuinfo on Linux (where `platform.processor()` is often empty)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"
