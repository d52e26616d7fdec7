"""`msd convert`: turn a research-format (EAGLE-style) MSD draft checkpoint into an msd draft folder."""

from __future__ import annotations

import argparse

from msd.errors import MSDError

DESCRIPTION = """\
Convert a research-format MSD draft checkpoint (config.json plus model.safetensors or pytorch_model.bin with fc.*,
layers.0.* and embed_tokens.weight) into an msd draft folder for `msd generate --draft`. Only the target's config is
read, not its weights.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a research-format MSD draft checkpoint",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="research-format checkpoint folder")
    parser.add_argument(
        "--target", required=True, metavar="PATH", help="the target model the draft was trained for: a local "
        "folder or a Hugging Face model id"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the msd draft to")
    parser.add_argument(
        "--no-decouple-visual",
        action="store_true",
        help="mark the draft as the EAGLE-style ablation that fuses image-token embeddings like text tokens",
    )
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from msd.draft.convert import convert_checkpoint
    from msd.targets import check_transformers_format

    try:
        target_config = AutoConfig.from_pretrained(arguments.target)
    except (OSError, ValueError) as error:
        raise MSDError(f"cannot load a model config from {arguments.target}: {error}") from None
    check_transformers_format(target_config, arguments.target)
    convert_checkpoint(
        arguments.checkpoint, arguments.output, target_config, decouple_visual=not arguments.no_decouple_visual
    )
    print(f"wrote msd draft to {arguments.output}")
    return 0
