"""Atomic writes: an interruption before the rename leaves the destination's old content in place."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import msd.files
from msd.files import atomic_save_tensors, atomic_write_text


@pytest.fixture
def interrupted_fsync(monkeypatch):
    """Make the flush to disk raise, as a kill between writing the data and renaming the file would stop it."""

    def interrupt(descriptor):
        raise KeyboardInterrupt

    monkeypatch.setattr(msd.files.os, "fsync", interrupt)


def test_interrupted_text_write_keeps_old_content(tmp_path, interrupted_fsync):
    path = tmp_path / "state.json"
    path.write_text('{"next_row": 4}')
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"next_row": 8, "stored": 8}')
    assert path.read_text() == '{"next_row": 4}'


def test_interrupted_tensor_write_keeps_old_file(tmp_path, interrupted_fsync):
    path = tmp_path / "shard.safetensors"
    old = {"r0/input_ids": torch.arange(3)}
    save_file(old, str(path))
    with pytest.raises(KeyboardInterrupt):
        atomic_save_tensors(path, {"r0/input_ids": torch.arange(5)}, {"format": "msd-features"})
    assert torch.equal(load_file(path)["r0/input_ids"], old["r0/input_ids"])


def test_write_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "card.json", "{}")
    atomic_save_tensors(tmp_path / "shard.safetensors", {"x": torch.zeros(2)}, {})
    assert sorted(os.listdir(tmp_path)) == ["card.json", "shard.safetensors"]
