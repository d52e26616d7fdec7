"""Atomic file writes: a reader sees a file's old content or its new content, never a part of it.

Each file is written under a hidden temporary name beside its destination, flushed to disk and renamed into place.
The temporary file is opened like any new file, so the destination gets the permissions the user's umask gives.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save


def temporary_name(path: Path) -> Path:
    """Return a hidden name beside `path`, unique to this process, to write to before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a part of it."""
    temporary = temporary_name(path)
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file the way `atomic_write_text` writes text."""
    temporary = temporary_name(path)
    with open(temporary, "wb") as handle:  # safetensors 0.8 save_file creates its file with mode 0600
        handle.write(save(tensors, metadata=metadata))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
