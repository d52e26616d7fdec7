"""`msd train` in two CPU processes (DDP over gloo): the same draft as one process, and an exact resume.

The runs unroll two draft steps, so the distributed wrapper runs the draft twice before each backward pass. The two
processes start through torchrun with ACCELERATE_USE_CPU set: accelerate 1.16's `accelerate launch --cpu
--num_processes 2` starts a single process, and without that variable accelerate treats each torchrun process on a
machine without GPUs as a run of its own.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import prepare_folder, tiny_target

#: The launcher runs through this interpreter, so the tests work without the virtual environment on PATH.
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A saved tiny target and seven one-sample feature folders whose answers all have different lengths."""
    root = tmp_path_factory.mktemp("distributed")
    target = tiny_target()
    target.model.save_pretrained(root / "target")
    target.processor.save_pretrained(root / "target")
    features = []
    for answer_tokens in (2, 5, 8, 11, 14, 17, 20):
        prepare_folder(target, root / f"answers-{answer_tokens}", 1, "text", answer_tokens=answer_tokens)
        features.append(root / f"answers-{answer_tokens}" / "features")
    return root / "target", features


def train(launcher: list[str], workspace, output: Path, config: str, *options: str) -> str:
    """Run `msd train` through `launcher`, assert it succeeded and return its standard error."""
    target, features = workspace
    config_file = output.parent / f"{output.name}.yaml"
    config_file.write_text(config)
    command = launcher + [
        "-m", "msd", "train", "--target", str(target), "--text-data", *map(str, features), "--output", str(output),
        "--config", str(config_file), "--mixed-precision", "no", "--eval-samples", "1", "--warmup-steps", "1",
        "--learning-rate", "1e-3", "--unroll-steps", "2", *options,
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "draft" / "model.safetensors"))


def test_two_processes_match_one(workspace, tmp_path):
    # One process with micro-batches of 2 and two processes with micro-batches of 1 train on the same sample pairs.
    # The two processes of a step count different slots, so only a loss averaged over every counted slot of the
    # step, across processes, trains the same weights. Noise is off, because its seeds depend on the micro-batch.
    no_noise = "loss:\n  noise_width: 0.0\n"
    options = ["--epochs", "1", "--gradient-accumulation", "1"]
    single_log = train([sys.executable], workspace, tmp_path / "single", no_noise, *options, "--micro-batch-size", "2")
    double_log = train(TWO_PROCESSES, workspace, tmp_path / "double", no_noise, *options, "--micro-batch-size", "1")

    # 6 training samples at 2 per step: one process alone would take 6 steps of 1 sample.
    assert "epoch 1: 3 steps" in single_log
    assert "epoch 1: 3 steps" in double_log
    expected, actual = weights(tmp_path / "single"), weights(tmp_path / "double")
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(actual[name].float(), tensor.float(), atol=1e-5), name
    assert list((tmp_path / "double").glob("checkpoint-*/draft/model.safetensors"))


def test_two_process_resume_is_exact(workspace, tmp_path):
    # With noise on and two micro-batches per process, resuming from the first epoch's checkpoint ends with the
    # weights of the uninterrupted run: each process restores its own random state.
    config = "curriculum:\n  text_only: 2\n  ramp: 0\n"
    options = ["--epochs", "2", "--micro-batch-size", "1", "--gradient-accumulation", "2", "--save-every", "1"]
    train(TWO_PROCESSES, workspace, tmp_path / "full", config, *options)
    checkpoints = sorted((tmp_path / "full").glob("checkpoint-*"))
    assert len(checkpoints) == 2
    shutil.copytree(checkpoints[0], tmp_path / "resumed" / checkpoints[0].name)
    log = train(TWO_PROCESSES, workspace, tmp_path / "resumed", config, *options, "--resume")

    assert "resumed from" in log
    expected, actual = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
