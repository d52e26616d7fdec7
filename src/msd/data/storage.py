"""The on-disk layout of prepared features: safetensors shards, JSONL manifests, resume state and the dataset card.

    OUTPUT/
      dataset_card.json                          settings shared by all parts, and counts once parts finish
      part-00000-of-00002-000000.safetensors     samples of part 0, tensors named "<key>/<field>"
      part-00000-of-00002.manifest.jsonl         one line per stored sample: key, shard file, sizes
      part-00000-of-00002.state.json             resume point: rows consumed, shards and manifest lines committed

A shard commits in three steps: the shard file is written under a temporary name and renamed, its manifest lines
are appended, and the state is replaced atomically. The state is the source of truth. On resume, shard files it does
not list are deleted and manifest lines past its count are cut. A run killed at any point therefore loses at most the
rows since the last commit, and those rows are processed again.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from msd.errors import MSDError
from msd.files import atomic_save_tensors, atomic_write_text

logger = logging.getLogger(__name__)

CARD_NAME = "dataset_card.json"
MANIFEST_SUFFIX = ".manifest.jsonl"
STATE_SUFFIX = ".state.json"
FORMAT_VERSION = 1
#: card settings that only name another one (a research kind name for its kind) and may differ on a resume
NAMING_SETTINGS = {"kind_name"}


@dataclass
class PartState:
    """Progress of one part, as of its last commit."""

    next_row: int  # first row not yet processed
    stored: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    tokens: int = 0
    visual_tokens: int = 0
    loss_tokens: int = 0
    finished: bool = False


class PartWriter:
    """Buffers one part's samples and commits them shard by shard (see the module docstring)."""

    def __init__(self, folder: Path, part_name: str, first_row: int, shard_size: int):
        if shard_size < 1:
            raise MSDError(f"--shard-size must be at least 1 sample, got {shard_size}.")
        self.folder = folder
        self.part_name = part_name
        self.shard_size = shard_size
        self.manifest_path = folder / f"{part_name}{MANIFEST_SUFFIX}"
        self.state_path = folder / f"{part_name}{STATE_SUFFIX}"
        self.state = self._resume(first_row)
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: list[dict] = []
        self.pending_skips: Counter = Counter()
        self.pending_counts: Counter = Counter()

    def _resume(self, first_row: int) -> PartState:
        state = PartState(next_row=first_row)
        if self.state_path.exists():
            state = PartState(**json.loads(self.state_path.read_text()))
        for path in self.folder.glob(f".{self.part_name}*.tmp"):  # left by a kill during an atomic write
            path.unlink()
        committed = set(state.shards)
        for path in self.folder.glob(f"*{self.part_name}-*.safetensors*"):
            if path.name not in committed:
                logger.info("discarding uncommitted shard %s", path.name)
                path.unlink()
        self._cut_manifest(state.stored)
        if state.finished:
            logger.warning(
                "%s was finished by an earlier run (%d samples stored, %d rows skipped), so nothing is redone. To "
                "process skipped rows again, for example after fixing --image-root, write to a new --output.",
                self.part_name, state.stored, sum(state.skipped.values()),
            )
        elif state.stored or state.skipped:
            logger.info("resuming %s at row %d (%d samples stored)", self.part_name, state.next_row, state.stored)
        return state

    def _cut_manifest(self, lines: int) -> None:
        if not self.manifest_path.exists():
            return
        with open(self.manifest_path, "rb") as handle:
            kept = b"".join(line for _, line in zip(range(lines), handle))
        if kept != self.manifest_path.read_bytes():
            atomic_write_text(self.manifest_path, kept.decode("utf-8"))

    def add(self, key: str, record: dict[str, torch.Tensor], entry: dict) -> None:
        """Buffer one sample's tensors (stored as "<key>/<field>") and its manifest entry."""
        for name, tensor in record.items():
            self.tensors[f"{key}/{name}"] = tensor.detach().cpu().contiguous()
        self.entries.append(entry)
        self.pending_counts.update(
            tokens=entry["length"], visual_tokens=entry["visual_tokens"], loss_tokens=entry["loss_tokens"]
        )

    def skip(self, reason: str) -> None:
        self.pending_skips[reason] += 1

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.shard_size

    def commit(self, next_row: int, finished: bool = False) -> None:
        """Write the buffered samples as one shard and record that rows before `next_row` are done."""
        state = self.state
        if self.entries:
            shard = f"{self.part_name}-{len(state.shards):06d}.safetensors"
            atomic_save_tensors(self.folder / shard, self.tensors, {"format": "msd-features", "part": self.part_name})
            lines = "".join(json.dumps({**entry, "shard": shard}) + "\n" for entry in self.entries)
            with open(self.manifest_path, "a", encoding="utf-8") as handle:
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())
            state.shards.append(shard)
            state.stored += len(self.entries)
        for reason, count in self.pending_skips.items():
            state.skipped[reason] = state.skipped.get(reason, 0) + count
        state.tokens += self.pending_counts["tokens"]
        state.visual_tokens += self.pending_counts["visual_tokens"]
        state.loss_tokens += self.pending_counts["loss_tokens"]
        state.next_row = next_row
        state.finished = finished
        atomic_write_text(self.state_path, json.dumps(asdict(state), indent=1))
        self.tensors, self.entries = {}, []
        self.pending_skips, self.pending_counts = Counter(), Counter()


def check_card(folder: Path, settings: dict) -> None:
    """Write the dataset card's settings, or check that an existing card was written with the same settings."""
    path = folder / CARD_NAME
    if path.exists():
        compare_card(folder, settings, partial=False)
        return
    atomic_write_text(path, json.dumps({"format_version": FORMAT_VERSION, "settings": settings}, indent=1))


def compare_card(folder: Path, settings: dict, partial: bool = True) -> None:
    """Raise MSDError when the folder's existing dataset card has other values for `settings`.

    partial: compare only the names in `settings` (a check before the target loads). A missing card passes.
    """
    path = folder / CARD_NAME
    if not path.exists():
        return
    existing = json.loads(path.read_text()).get("settings", {})
    names = (set(settings) if partial else set(existing) | set(settings)) - NAMING_SETTINGS
    changed = sorted(name for name in names if existing.get(name) != settings.get(name))
    if changed:
        details = "; ".join(f"{name}: {existing.get(name)!r} -> {settings.get(name)!r}" for name in changed)
        raise MSDError(
            f"{folder} contains features prepared with other settings ({details}). "
            "Resume with the same options, or write to a new --output folder."
        )


def read_part_states(folder: Path) -> dict[str, PartState]:
    states = {}
    for path in sorted(folder.glob(f"part-*{STATE_SUFFIX}")):
        states[path.name[: -len(STATE_SUFFIX)]] = PartState(**json.loads(path.read_text()))
    return states


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def update_card(folder: Path) -> dict:
    """Rewrite the dataset card's counts and sizes from every part's state; returns the card."""
    path = folder / CARD_NAME
    card = json.loads(path.read_text())
    states = read_part_states(folder)
    skipped: Counter = Counter()
    for state in states.values():
        skipped.update(state.skipped)
    card["counts"] = {
        "samples": sum(state.stored for state in states.values()),
        "skipped": dict(sorted(skipped.items())),
        "tokens": sum(state.tokens for state in states.values()),
        "visual_tokens": sum(state.visual_tokens for state in states.values()),
        "loss_tokens": sum(state.loss_tokens for state in states.values()),
        "shards": sum(len(state.shards) for state in states.values()),
    }
    card["parts"] = {name: {"samples": state.stored, "finished": state.finished} for name, state in states.items()}
    card["size_bytes"] = folder_bytes(folder)
    atomic_write_text(path, json.dumps(card, indent=1))
    return card
