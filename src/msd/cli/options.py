"""Command-line options shared by the sub-commands that load models and decode."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from msd.errors import MSDError
from msd.targets.cpu_linear import AUTO

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_options(parser: argparse.ArgumentParser, draft_required: bool = False) -> None:
    parser.add_argument(
        "--target", required=True, metavar="PATH", help="target model: a local folder or a Hugging Face model id"
    )
    parser.add_argument(
        "--draft",
        required=draft_required,
        metavar="PATH",
        help="MSD draft folder (from msd train or msd convert)" + ("" if draft_required else "; omit for plain decoding"),
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight dtype; auto keeps the checkpoint's (default auto). On CPUs use bfloat16 where the CPU has "
        "native bfloat16 (AVX-512 BF16 or AMX) and float32 elsewhere, not float16",
    )
    parser.add_argument("--device", default="cpu", help="torch device, for example cpu or cuda:0 (default cpu)")
    parser.add_argument(
        "--cpu-linear-rows",
        type=parse_cpu_linear_rows,
        default=AUTO,
        metavar="N|auto",
        help="on a CPU, compute linear layers as W @ x.T for inputs of at most N tokens, which speeds up "
        "few-token forwards on some CPUs and slows them on others. auto times both products at load and "
        "picks N, and whether one token runs faster padded to two (an explicit N never pads); 0 keeps PyTorch's "
        "layers (default auto). bfloat16 targets with batch-invariant kernels ignore it",
    )


def parse_cpu_linear_rows(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        rows = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid row count {text!r}: use a whole number or auto") from None
    if rows < 0:
        raise argparse.ArgumentTypeError(f"invalid row count {rows}: use 0 or more, or auto")
    return rows


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 means greedy decoding (default 0)",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this "
        "total probability, in (0, 1] (default 1: off)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sampling keeps the k most likely tokens; 0 means off (default 0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")


def add_tree_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--depth", type=int, default=5, help="draft steps per cycle: the depth of the draft's tree (default 5)"
    )
    parser.add_argument(
        "--tree-top-k",
        type=int,
        default=8,
        help="children proposed per expanded tree node, and nodes expanded per draft step (default 8)",
    )
    parser.add_argument(
        "--total-tokens",
        type=int,
        default=None,
        help="size of the draft's tree in tokens, root included; the target verifies these plus the lookup's tokens "
        "per forward. Default 48, sized for GPUs, or 16 minus --lookup-tokens on a bfloat16 target with "
        "batch-invariant CPU kernels (they verify at most 16 tokens exactly). CPUs do better with small trees: msd "
        "bench --tune-tree picks one by measurement",
    )
    parser.add_argument(
        "--lookup-tokens",
        type=int,
        default=4,
        help="maximum tokens per cycle copied from where the text's last 1-3 tokens occurred before (prompt or "
        "answer) and added to the draft's tree (in msd bench, to the msd and eagle trees), within the tokens the "
        "target verifies exactly; 0 turns this off (default 4)",
    )


def sampling_from(arguments: argparse.Namespace):
    from msd.decoding import SamplingParams

    if not math.isfinite(arguments.temperature) or arguments.temperature < 0:
        raise MSDError(f"--temperature must be 0 (greedy) or a positive finite number, got {arguments.temperature}")
    try:
        return SamplingParams(
            do_sample=arguments.temperature > 0,
            temperature=arguments.temperature if arguments.temperature > 0 else 1.0,
            top_k=arguments.top_k,
            top_p=arguments.top_p,
        )
    except ValueError as error:
        raise MSDError(flag_names(str(error))) from None


def tree_from(arguments: argparse.Namespace):
    from msd.decoding import TreeParams

    total_tokens = TreeParams.total_tokens if arguments.total_tokens is None else arguments.total_tokens
    try:
        return TreeParams(
            depth=arguments.depth,
            top_k=arguments.tree_top_k,
            total_tokens=total_tokens,
            lookup_tokens=arguments.lookup_tokens,
        )
    except ValueError as error:
        raise MSDError(flag_names(str(error))) from None


#: field names in TreeParams and SamplingParams errors, and the command-line options that set them
FLAG_NAMES = {
    "tree depth": "--depth",
    "tree top_k": "--tree-top-k",
    "tree total_tokens": "--total-tokens",
    "tree lookup_tokens": "--lookup-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
}


def flag_names(message: str) -> str:
    """Replace the parameter name that starts a TreeParams or SamplingParams error with its option."""
    for field, flag in FLAG_NAMES.items():
        if message.startswith(field + " "):
            return flag + message[len(field) :]
    return message


def check_output_file(path: str | None, option: str) -> None:
    """Raise MSDError unless `path` can be written: its folder exists and the path is not a folder."""
    if path is None:
        return
    file = Path(path)
    if file.is_dir():
        raise MSDError(f"{option} {path} is a folder. Pass a file name, for example {file / 'stats.json'}.")
    if not file.parent.is_dir():
        raise MSDError(f"{option} {path}: folder {file.parent} not found. Create it or choose another path.")


def check_device(device: str) -> None:
    """Raise MSDError for a device string torch cannot parse or a CUDA device this torch build cannot use."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise MSDError(f"invalid --device {device!r}. Pass cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise MSDError(
            f"--device {device}: this torch build or machine has no CUDA device. Install a CUDA build of torch "
            "(TORCH_SPEC for make) or pass --device cpu."
        )


def tree_argument(text: str):
    """Parse a "depth,top_k,total_tokens" command-line value, reporting a malformed one as an argparse error."""
    from msd.decoding import TreeParams

    try:
        return TreeParams.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def check_exact_trees(parser: argparse.ArgumentParser, trees, flag: str) -> None:
    """Stop with a usage error when a tree is larger than msd's batch-invariant bfloat16 kernels verify exactly."""
    from msd.targets.batch_invariant import ROWS

    too_large = [tree.total_tokens for tree in trees if tree.total_tokens > ROWS]
    if too_large:
        parser.error(f"{flag}: bfloat16 trees may hold at most {ROWS} tokens, got {too_large}")


def fit_default_tree(tree, target, arguments: argparse.Namespace):
    """Lower the default tree size so that it and the lookup's tokens fit the largest tree `target` verifies exactly,
    unless --total-tokens was given."""
    limit = target.max_tree_tokens
    if limit is not None and tree.lookup_tokens >= limit:
        raise MSDError(
            f"--lookup-tokens {tree.lookup_tokens} leaves no room for the draft's tree: this target verifies at most "
            f"{limit} tokens exactly. Pass a smaller value, such as the default 4."
        )
    if arguments.total_tokens is not None:
        # A tree over the limit alone is rejected with its own error when decoding starts.
        crowded = limit is not None and tree.total_tokens <= limit < tree.total_tokens + tree.lookup_tokens
        if crowded:
            logger.warning(
                "the n-gram lookup gets as few as %d of its %d tokens per cycle: this target verifies at most %d "
                "tokens exactly and the draft's tree takes up to %d. Lower --total-tokens to give it room, or pass "
                "--lookup-tokens 0 to turn it off",
                max(limit - tree.total_tokens, 0), tree.lookup_tokens, limit, tree.total_tokens,
            )
        return tree
    fitted = tree.capped(limit)
    if fitted is not tree:
        logger.info(
            "tree size lowered from the default %d to %d: this target verifies at most %d tokens exactly, and %d are "
            "left for the n-gram lookup (--lookup-tokens)",
            tree.total_tokens, fitted.total_tokens, limit, tree.lookup_tokens,
        )
    return fitted
