"""The trained projector's file: the `LlavaMultiModalProjector` tensors plus metadata, in safetensors format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from msd.errors import MSDError

#: The trained projector shipped in the msd source tree, used by the build when the file exists.
PACKAGED_PROJECTOR = Path(__file__).parent / "weights" / "projector.safetensors"


def write_projector(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write projector tensors (stored as contiguous float32 copies) and string metadata, replacing `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    tensors = {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in state.items()}
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def read_projector(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read projector tensors and their metadata; raises MSDError for a missing or unreadable file."""
    if not path.is_file():
        raise MSDError(f"projector file not found: {path}. Train one with `msd embedded train-projector`.")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise MSDError(f"cannot read the projector file {path}: {error}. Retrain or restore it.") from None
    return state, metadata


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
