"""`msd train` under `accelerate launch` with two CPU processes (gloo) saves the same shapes as one process.

Both runs unroll two draft steps, so the distributed wrapper runs the draft twice before each backward pass.
"""

import os
import subprocess
import sys

from safetensors.torch import load_file

from train_helpers import prepare_folder, tiny_target


def train_command(launcher: list[str], target, text, output) -> list[str]:
    return launcher + [
        "-m", "msd", "train", "--target", str(target), "--text-data", str(text), "--output", str(output),
        "--epochs", "1", "--micro-batch-size", "1", "--gradient-accumulation", "1", "--mixed-precision", "no",
        "--eval-samples", "1", "--warmup-steps", "1", "--learning-rate", "1e-3", "--unroll-steps", "2",
    ]


def test_two_process_launch_matches_single_shapes(tmp_path):
    target = tiny_target()
    target.model.save_pretrained(tmp_path / "target")
    target.processor.save_pretrained(tmp_path / "target")
    prepare_folder(target, tmp_path / "text", 6, "text", answer_tokens=8)
    features = tmp_path / "text" / "features"
    environment = dict(os.environ, OMP_NUM_THREADS="1")

    single = subprocess.run(
        train_command([sys.executable], tmp_path / "target", features, tmp_path / "single"),
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    # The launcher runs through this interpreter, so the test works without the virtual environment on PATH.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = subprocess.run(
        train_command(launcher, tmp_path / "target", features, tmp_path / "double"),
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]

    expected = load_file(str(tmp_path / "single" / "draft" / "model.safetensors"))
    actual = load_file(str(tmp_path / "double" / "draft" / "model.safetensors"))
    assert {name: tensor.shape for name, tensor in actual.items()} == {
        name: tensor.shape for name, tensor in expected.items()
    }
    assert list((tmp_path / "double").glob("checkpoint-*/draft/model.safetensors"))
