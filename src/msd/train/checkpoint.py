"""Training checkpoints: atomic folders with a loadable draft and the state to resume exactly, with rotation.

Layout of `OUTPUT/checkpoint-00001234` (the number is the optimizer step):

    draft/               DraftModel.save_pretrained: config.json + model.safetensors, what `msd generate` loads
    state/               accelerate's save_state: weights, optimizer, RNG states, scheduler
    trainer_state.json   step, curriculum position, batch geometry and the training config

A checkpoint is written under a hidden `.checkpoint-*.partial` name and renamed when complete, so a run killed
mid-write leaves no folder that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

from msd.errors import MSDError

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def checkpoint_step(path: Path) -> int:
    """Return the optimizer step in a checkpoint folder's name (-1 for a folder not named checkpoint-N)."""
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if checkpoint_step(path) >= 0 and (path / STATE_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def save_checkpoint(accelerator, draft, output_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Write the checkpoint of `step` atomically and delete all but the newest `keep` checkpoints.

    Every process takes part (accelerate and DeepSpeed write per-process files); the main process writes the draft
    and the trainer state and renames the folder.
    """
    final = output_dir / checkpoint_name(step)
    partial = output_dir / f".{final.name}.partial"
    if accelerator.is_main_process:
        recover_replacement(output_dir)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(partial / "state"))
    accelerator.wait_for_everyone()  # every process's state files exist before the main process sets their mode
    if accelerator.is_main_process:
        draft.save_pretrained(partial / "draft")
        (partial / STATE_NAME).write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
        share_like(partial / "state", partial / STATE_NAME)
        # A checkpoint of the same step is replaced only once the new one is complete, so a kill keeps one of them.
        replaced = output_dir / f".{final.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        if final.exists():
            os.replace(final, replaced)
        os.replace(partial, final)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in list_checkpoints(output_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old)
                logger.info("removed old checkpoint %s (keeping %d)", old.name, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def recover_replacement(output_dir: Path) -> None:
    """Finish a same-step replacement that a kill cut between its two renames (see `save_checkpoint`).

    The new checkpoint takes the step's name when it is complete under its `.partial` name, else the old one does.
    """
    for replaced in Path(output_dir).glob(".checkpoint-*.replaced"):
        name = replaced.name[1 : -len(".replaced")]
        final, partial = replaced.with_name(name), replaced.with_name(f".{name}.partial")
        if final.exists():
            continue
        source = partial if (partial / STATE_NAME).is_file() else replaced
        try:  # another process of the same launch may have finished it first
            os.replace(source, final)
        except FileNotFoundError:
            continue
        logger.warning("recovered %s from an interrupted save", final.name)
        shutil.rmtree(replaced, ignore_errors=True)


def share_like(folder: Path, reference: Path) -> None:
    """Give every file under `folder` the permissions of `reference`, a file msd created with the user's umask.

    accelerate's `save_state` writes the model weights through safetensors, which creates them readable by their owner
    only. The rest of a checkpoint already follows the umask.
    """
    mode = stat.S_IMODE(reference.stat().st_mode)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def find_resume_checkpoint(resume: str | Path | bool, output_dir: Path) -> Path:
    """Find the checkpoint to resume from: an explicit folder, or the newest one in `output_dir` when `resume` is True."""
    if resume is True:
        recover_replacement(output_dir)
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise MSDError(f"no checkpoint to resume from in {output_dir}. Start without --resume.")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise MSDError(f"{path} is not a training checkpoint (no {STATE_NAME}). Pass a checkpoint-* folder.")
    return path


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_NAME).read_text())
