"""`msd train`: train an MSD draft on features stored by `msd prepare-data`, on CPU, one GPU or many."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

DESCRIPTION = """\
Train an MSD draft for a target from prepared features: text features first, then a ramp of multimodal features
(the curriculum). Hyper-parameters default to the MSD research values; --config reads them from a JSON or YAML file
and the options below override single values. For several GPUs or DeepSpeed run it under `accelerate launch`, for
example `accelerate launch --config_file configs/accelerate_ddp.yaml -m msd train ...`.
"""

#: command-line override -> (TrainConfig field, type, help)
OVERRIDES = {
    "--epochs": ("epochs", int, "training epochs"),
    "--max-steps": ("max_steps", int, "stop after this many optimizer steps"),
    "--micro-batch-size": ("micro_batch_size", int, "samples per forward on each process"),
    "--gradient-accumulation": ("gradient_accumulation", int, "micro-batches per optimizer step"),
    "--learning-rate": ("learning_rate", float, "peak AdamW learning rate"),
    "--warmup-steps": ("warmup_steps", int, "optimizer steps of linear learning-rate warm-up"),
    "--max-grad-norm": ("max_grad_norm", float, "gradient clipping norm"),
    "--mixed-precision": ("mixed_precision", str, "no, bf16 or fp16"),
    "--max-length": ("max_length", int, "tokens kept per sample"),
    "--seed": ("seed", int, "seed of initialisation, data order and noise"),
    "--save-every": ("save_every", int, "optimizer steps between checkpoints; 0 turns step checkpoints off"),
    "--keep-checkpoints": ("keep_checkpoints", int, "checkpoints kept; older ones are deleted"),
    "--eval-every": (
        "eval_every",
        int,
        "optimizer steps between held-out evaluations, besides the one at each epoch end; 0: epoch ends only",
    ),
    "--eval-samples": (
        "eval_samples", int, "held-out samples per source, at most a tenth of it (at least one if it has two or more)"
    ),
    "--log-every": ("log_every", int, "optimizer steps between metric logs, besides the one at each epoch end"),
    "--num-workers": ("num_workers", int, "data loader worker processes"),
    "--draft-vocab-size": (
        "draft_vocab_size",
        int,
        "a fresh draft scores only this many target tokens, the most frequent in the training answers",
    ),
    "--draft-layers": (
        "draft_layers",
        int,
        "decoder layers of a fresh draft, one by default as in the research drafts",
    ),
    "--save-dtype": ("save_dtype", str, "dtype of the final draft's weights: float32, float16 or bfloat16"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an MSD draft on prepared features",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", required=True, metavar="PATH", help="the target model: a local folder or a "
                        "Hugging Face model id (its embedding and LM head are used, frozen)")
    parser.add_argument(
        "--text-data", nargs="+", metavar="DIR", help="text features from `msd prepare-data --kind text` (one or more)"
    )
    parser.add_argument(
        "--vision-data",
        nargs="+",
        metavar="DIR",
        help="multimodal features from `msd prepare-data --kind vision` (one or more)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for checkpoints and the final draft")
    parser.add_argument("--config", metavar="FILE", help="training config, JSON or YAML (see configs/)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --output, or from the given checkpoint folder",
    )
    parser.add_argument("--init-draft", metavar="DIR", help="start from this msd draft instead of a fresh one")
    parser.add_argument(
        "--target-dtype", default="auto", help="dtype the target's embedding and LM head are loaded in (default auto)"
    )
    for flag, (_, kind, text) in OVERRIDES.items():
        parser.add_argument(flag, type=kind, help=f"{text} (overrides the config)")
    parser.add_argument(
        "--unroll-steps",
        type=int,
        metavar="N",
        help="also train draft steps 2 .. N on the draft's own outputs, as the drafter runs them (training-time "
        "test; up to N times the time per step; overrides the config's loss.unroll_steps, whose default is 1)",
    )
    parser.add_argument(
        "--no-decouple-visual",
        dest="decouple_visual",
        action="store_const",
        const=False,
        help="train the non-decoupled (EAGLE-style) ablation, which `msd bench --eagle-draft` compares with msd",
    )
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    from msd.draft import DraftModel
    from msd.errors import MSDError
    from msd.targets import load_target
    from msd.train import DraftTrainer, load_train_config, make_accelerator
    from msd.train.checkpoint import find_resume_checkpoint
    from msd.train.data import open_feature_folders

    if not arguments.text_data and not arguments.vision_data:
        raise MSDError("no training data: pass --text-data, --vision-data or both.")
    overrides = {field: getattr(arguments, flag[2:].replace("-", "_")) for flag, (field, _, _) in OVERRIDES.items()}
    overrides["decouple_visual"] = arguments.decouple_visual
    config = load_train_config(arguments.config).with_overrides(**overrides)
    if arguments.unroll_steps is not None:
        config = replace(config, loss=replace(config.loss, unroll_steps=arguments.unroll_steps))
    text_data = open_feature_folders(arguments.text_data) if arguments.text_data else None
    vision_data = open_feature_folders(arguments.vision_data) if arguments.vision_data else None

    accelerator = make_accelerator(config, arguments.output)
    target = load_target(arguments.target, dtype=arguments.target_dtype, device=accelerator.device)
    draft = None
    if arguments.init_draft:
        draft = DraftModel.from_pretrained(arguments.init_draft)
    elif arguments.resume:
        # The checkpoint's draft fixes the architecture (layers, vocabulary); the state then loads its weights.
        draft = DraftModel.from_pretrained(find_resume_checkpoint(arguments.resume, Path(arguments.output)) / "draft")
    trainer = DraftTrainer(config, target, text_data, vision_data, arguments.output, accelerator, draft=draft)
    final = trainer.train(resume=arguments.resume)
    if accelerator.is_main_process:
        print(f"draft saved to {final}")
    return 0
