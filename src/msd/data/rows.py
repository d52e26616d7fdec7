"""Row sources (a `.json` list, a `.jsonl` file, a Hugging Face `datasets` dataset) and their split into parts.

Rows are read by index, so a run can start anywhere, resume at a row and take every N-th row. A malformed JSON line
raises RowError when its row is read, so one bad line skips one row and not the whole file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from msd.data.conversations import RowError, SkipReason
from msd.errors import MSDError

logger = logging.getLogger(__name__)


class JsonlRows(Sequence):
    """The lines of a JSON Lines file, parsed when read; blank lines are not rows."""

    def __init__(self, path: Path):
        with open(path, encoding="utf-8") as handle:
            self.lines = [line for line in handle if line.strip()]

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict:
        try:
            return json.loads(self.lines[index])
        except json.JSONDecodeError as error:
            raise RowError(SkipReason.MALFORMED_JSON, f"line {index + 1}: {error}") from None


def open_rows(source, split: str = "train") -> Sequence:
    """Rows of a `.json` list, a `.jsonl` file, a `datasets.save_to_disk` folder or a `datasets` Hub id.

    A `datasets.Dataset` (or any sequence of row dicts) passes through unchanged.
    """
    if not isinstance(source, (str, Path)):
        return source
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        return JsonlRows(path)
    if path.is_file() and path.suffix == ".json":
        return _read_json_list(path)
    if path.is_file():
        raise MSDError(f"unsupported data file {path}: expected a .json list, a .jsonl file or a datasets folder.")
    if not path.exists() and _names_a_local_file(str(source)):
        raise MSDError(f"data file not found: {path}. Check the path (a Hub dataset id has no file extension).")
    return _open_dataset(source, split)


def _names_a_local_file(source: str) -> bool:
    """Return True for a source that is clearly a local path (a row-file extension, or a leading / . or ~)."""
    return source.endswith((".json", ".jsonl")) or source.startswith(("/", ".", "~"))


def _read_json_list(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except json.JSONDecodeError as error:
        raise MSDError(
            f"{path} is not valid JSON ({error}). Fix the file, or write one row per line as .jsonl so a bad row "
            "is skipped instead of stopping the run."
        ) from None
    if not isinstance(rows, list):
        raise MSDError(f"{path} contains a JSON {type(rows).__name__}; expected a list of LLaVA-format rows.")
    return rows


def _open_dataset(source: str | Path, split: str):
    try:
        import datasets
    except ImportError:
        raise MSDError(
            f"{source} is not a .json or .jsonl file; reading a datasets dataset needs the datasets package "
            "(pip install 'msd[data]')."
        ) from None
    path = Path(source)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    else:
        try:
            loaded = datasets.load_dataset(str(source), split=split)
        except (FileNotFoundError, ValueError, ConnectionError) as error:
            raise MSDError(f"cannot load data {source!s}: {error}. Pass a .json/.jsonl file or a dataset.") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MSDError(f"{source} has no split {split!r}; available: {', '.join(loaded)}. Set --split.")
        loaded = loaded[split]
    return loaded


@dataclass(frozen=True)
class Part:
    """Part `index` of `count`: the rows whose index past `start` is congruent to `index` modulo `count`."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise MSDError(f"invalid shard {self.index}/{self.count}: expected I/N with 0 <= I < N, e.g. 0/4.")

    @classmethod
    def parse(cls, text: str) -> Part:
        index, slash, count = text.partition("/")
        if not slash or not index.strip().isdigit() or not count.strip().isdigit():
            raise MSDError(f"invalid --shard {text!r}: expected I/N, e.g. 0/4 for the first of four parts.")
        return cls(int(index), int(count))

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def split(self, process_index: int, process_count: int) -> Part:
        """This part split among `process_count` processes; the sub-parts are disjoint and cover this part."""
        return Part(self.index + self.count * process_index, self.count * process_count)

    def rows(self, total: int, start: int = 0, limit: int | None = None) -> range:
        """Row indices of this part within rows [start, start + limit) of `total`."""
        if start < 0:
            raise MSDError(f"--start must be 0 or more, got {start}.")
        if limit is not None and limit < 0:
            raise MSDError(f"--limit must be 0 or more, got {limit}.")
        end = total if limit is None else min(total, start + limit)
        return range(start + self.index, max(end, start), self.count)
