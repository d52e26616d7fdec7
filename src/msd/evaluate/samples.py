"""Evaluation samples: LLaVA-format JSON/JSONL files, `datasets` datasets, and the local task shipped with msd.

A LLaVA-format row holds an `image` (a file name, relative to an image folder, or a list of them) and `conversations`
whose first human turn is the prompt (with `<image>` markers) and whose first gpt turn, if any, is the reference
answer. msd reads two optional fields beside those: `task` (a name that groups samples in the report) and `stop`
(the task's stop strings).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from msd.errors import MSDError
from msd.images import load_image

#: the local task: real photos from scikit-image with questions and captions, stored inside the package
LOCAL_TASK_FOLDER = Path(__file__).resolve().parent / "local_task"
LOCAL_TASK_NAME = "local"
DEFAULT_TASK = "default"


@dataclass
class EvalSample:
    """One prompt with its images, the task it belongs to and that task's stop strings."""

    sample_id: str
    task: str
    prompt: str
    images: list[Image.Image]
    reference: str | None = None
    stop_strings: list[str] = field(default_factory=list)


def load_samples(source: str, image_folder: str | None = None, split: str = "test", limit: int | None = None):
    """Load samples from `local`, a LLaVA-format .json/.jsonl file, or a `datasets` dataset folder saved to disk.

    Image paths in a JSON file are relative to `image_folder`, which defaults to the file's own folder (the local
    task keeps them in `images/`).
    """
    if source == LOCAL_TASK_NAME:
        return load_llava_file(LOCAL_TASK_FOLDER / "samples.jsonl", LOCAL_TASK_FOLDER / "images", limit)
    path = Path(source)
    if path.suffix in (".json", ".jsonl"):
        return load_llava_file(path, Path(image_folder) if image_folder else path.parent, limit)
    if path.is_dir():
        return load_dataset_folder(path, split, limit)
    raise MSDError(
        f"unknown evaluation set {source!r}. Pass `{LOCAL_TASK_NAME}`, a LLaVA-format .json or .jsonl file, or a "
        "folder written by `datasets.Dataset.save_to_disk`."
    )


def load_llava_file(path: Path, image_folder: Path, limit: int | None = None) -> list[EvalSample]:
    if not path.is_file():
        raise MSDError(f"evaluation file not found: {path}")
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise MSDError(
                    f"invalid JSON on line {number} of {path}: {error.msg} (column {error.colno}). "
                    "Fix or remove that line."
                ) from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise MSDError(f"invalid JSON in {path}: {error}") from None
    if not isinstance(rows, list):
        raise MSDError(f"{path} must contain a list of LLaVA-format rows, got {type(rows).__name__}")
    rows = rows[:limit] if limit else rows

    def open_image(name: str):
        if not (image_folder / name).exists():
            raise MSDError(
                f"image {name!r} of {path} not found in the image folder {image_folder}. Pass the folder that contains "
                "the evaluation images with --image-folder (it defaults to the evaluation file's folder)."
            )
        return load_image(image_folder / name)

    return [sample_from_row(row, index, open_image) for index, row in enumerate(rows)]


def load_dataset_folder(path: Path, split: str, limit: int | None = None) -> list[EvalSample]:
    """Samples from a `datasets` dataset saved with `save_to_disk`, in LLaVA format with PIL images in `image`."""
    try:
        import datasets
    except ImportError:
        raise MSDError("reading a dataset folder needs the `datasets` package: pip install datasets") from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise MSDError(f"dataset {path} has no split {split!r}; it has {', '.join(dataset)}. Pass --split.")
        dataset = dataset[split]
    rows: Iterable[dict] = dataset.select(range(min(limit, len(dataset)))) if limit else dataset
    return [sample_from_row(row, index, lambda image: image.convert("RGB")) for index, row in enumerate(rows)]


def sample_from_row(row: dict, index: int, open_image) -> EvalSample:
    """Build a sample from a LLaVA-format row; `open_image` turns one `image` entry into a PIL image."""
    sample_id = str(row.get("id", index))
    turns = row.get("conversations")
    if not turns or not isinstance(turns, list):
        raise MSDError(f"sample {sample_id} has no `conversations` list; rows must be in LLaVA format.")
    human = [turn["value"] for turn in turns if turn.get("from") == "human"]
    answers = [turn["value"] for turn in turns if turn.get("from") == "gpt"]
    if not human:
        raise MSDError(f"sample {sample_id} has no human turn in `conversations`.")
    entries = row.get("image") or []
    entries = entries if isinstance(entries, list) else [entries]
    stop = row.get("stop") or []
    return EvalSample(
        sample_id=sample_id,
        task=str(row.get("task") or DEFAULT_TASK),
        prompt=human[0],
        images=[open_image(entry) for entry in entries],
        reference=answers[0] if answers else None,
        stop_strings=[stop] if isinstance(stop, str) else list(stop),
    )
