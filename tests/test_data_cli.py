"""`msd prepare-data` on a saved tiny LLaVA: help text, a full run, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from data_helpers import chat, write_images, write_jsonl
from safetensors.torch import load_file
from tiny_models import build_llava

from msd.cli import build_parser, main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    model, processor = build_llava(seed=0, dtype=torch.float32)
    model.save_pretrained(root / "target")
    processor.save_pretrained(root / "target")
    write_images(root / "images", {f"{index}.png": (56 + 4 * index, 56) for index in range(3)})
    rows = [chat("<image>\nWhat is it?", f"A cat number {index}.", image=f"{index % 3}.png", row_id=str(index))
            for index in range(6)]
    rows.insert(3, chat("Only a question"))
    write_jsonl(root / "rows.jsonl", rows)
    return root


def arguments(workspace: Path, output: Path) -> list[str]:
    return [
        "prepare-data", "--target", str(workspace / "target"), "--data", str(workspace / "rows.jsonl"),
        "--image-root", str(workspace / "images"), "--output", str(output), "--kind", "llava_v15_v",
        "--max-length", "500", "--shard-size", "2", "--device", "cpu",
    ]


#: Runs the CLI in a child process that SIGKILLs itself while committing the second shard: the shard file is renamed
#: into place and its manifest lines are appended, but the state that commits them is not written yet.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import msd.data.storage as storage
    from msd.cli import main

    write_text = storage.atomic_write_text
    state_writes = 0

    def killing_write(path, text):
        global state_writes
        if path.name.endswith(".state.json"):
            state_writes += 1
            if state_writes == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        write_text(path, text)

    storage.atomic_write_text = killing_write
    sys.exit(main(sys.argv[1:]))
    """
)


def folder_contents(folder: Path) -> tuple[dict[str, bytes], dict[str, dict[str, torch.Tensor]]]:
    manifests = {path.name: path.read_bytes() for path in folder.glob("*.manifest.jsonl")}
    shards = {path.name: load_file(path) for path in folder.glob("*.safetensors")}
    return manifests, shards


def test_help_documents_every_option():
    subparsers = build_parser()._subparsers._group_actions[0]
    parser = subparsers.choices["prepare-data"]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help text"
    text = parser.format_help()
    for unit in ("tokens", "samples", "rows"):
        assert unit in text


def test_run_then_rerun_is_noop(workspace, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(arguments(workspace, output)) == 0
    first = folder_contents(output)
    assert len(first[0]["part-00000-of-00001.manifest.jsonl"].splitlines()) == 6
    assert len(first[1]) == 3
    assert "skipped rows: no_assistant_turn 1" in capsys.readouterr().err
    assert main(arguments(workspace, output)) == 0
    second = folder_contents(output)
    assert second[0] == first[0]
    assert second[1].keys() == first[1].keys()


def test_changed_options_fail_before_loading(workspace, tmp_path, capsys, monkeypatch):
    # A rerun into a folder prepared with other options stops before the target loads (minutes for a 7B model).
    import msd.targets

    output = tmp_path / "out"
    assert main(arguments(workspace, output) + ["--limit", "2"]) == 0

    def no_loading(*args, **kwargs):
        raise AssertionError("the target was loaded")

    monkeypatch.setattr(msd.targets, "load_target", no_loading)
    capsys.readouterr()
    assert main(arguments(workspace, output) + ["--limit", "2", "--regenerate"]) == 2
    assert "other settings (regenerate: False -> True" in capsys.readouterr().err


def test_every_row_skipped_fails(workspace, tmp_path, capsys, monkeypatch, caplog):
    # Image paths read from the current folder find no image: the run names the option to pass and exits with an
    # error. The rerun, whose part is finished, warns that it redoes nothing.
    output = tmp_path / "out"
    options = arguments(workspace, output)
    del options[options.index("--image-root") : options.index("--image-root") + 2]
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        assert main(options + ["--limit", "3"]) == 2
    assert "pass --image-root" in caplog.text
    assert "no sample was stored: every row was skipped" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(options + ["--limit", "3"]) == 2
    assert "finished by an earlier run" in caplog.text


def test_accelerate_process_takes_its_part(workspace, tmp_path, monkeypatch):
    import accelerate

    class SecondOfTwoProcesses:
        num_processes, process_index, is_main_process, device = 2, 1, False, "cpu"

        def __init__(self, cpu: bool = False):
            pass

        def wait_for_everyone(self):
            pass

    monkeypatch.setattr(accelerate, "PartialState", SecondOfTwoProcesses)
    output = tmp_path / "out"
    assert main(arguments(workspace, output) + ["--shard", "0/2"]) == 0
    # machine part 0 of 2 split over 2 processes: process 1 takes part 2 of 4, the rows equal to 2 modulo 4
    manifest = (output / "part-00002-of-00004.manifest.jsonl").read_text()
    assert [json.loads(line)["row"] for line in manifest.splitlines()] == [2, 6]
    assert [path.name for path in output.glob("*.state.json")] == ["part-00002-of-00004.state.json"]


def test_two_processes_write_both_parts(workspace, tmp_path):
    # Two real processes (torchrun, a gloo process group) each store their part, and the main process's summary counts both.
    output = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "msd"]
    environment = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = subprocess.run(launcher + arguments(workspace, output), capture_output=True, text=True, env=environment,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for part in (0, 1):
        manifest = (output / f"part-0000{part}-of-00002.manifest.jsonl").read_text()
        rows[part] = [json.loads(line)["row"] for line in manifest.splitlines()]
    assert rows[0] == [0, 2, 4, 6]  # row 3 has no image, so the vision kind skips it
    assert rows[1] == [1, 5]
    assert json.loads((output / "dataset_card.json").read_text())["counts"]["samples"] == 6


def test_bad_option_exits_with_message(workspace, tmp_path, capsys):
    assert main(arguments(workspace, tmp_path / "out") + ["--shard", "3/2"]) == 2
    assert "invalid shard 3/2" in capsys.readouterr().err
    assert main(arguments(workspace, tmp_path / "out") + ["--regenerate", "--regenerate-batch-size", "0"]) == 2
    assert "--regenerate-batch-size must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--kind", "images"], "unknown dataset kind 'images'"),
        (["--max-length", "1"], "--max-length must be at least 2 tokens, got 1"),
        (["--shard-size", "0"], "--shard-size must be at least 1 sample, got 0"),
        (["--start", "-1"], "--start must be 0 or more, got -1"),
        (["--regenerate", "--regenerate-max-tokens", "0"], "--regenerate-max-tokens must be at least 1, got 0"),
        (["--limit", "0"], "--limit must be at least 1 row, got 0"),
        (["--log-skipped", "-1"], "--log-skipped must be 0 or more, got -1"),
    ],
)
def test_bad_value_fails_before_loading(workspace, tmp_path, capsys, options, message):
    # The target path does not exist: each bad value must be named first, without waiting for a model to load.
    command = arguments(workspace, tmp_path / "out") + options
    command[command.index("--target") + 1] = str(tmp_path / "no-such-target")
    assert main(command) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """Manifests and shards of an uninterrupted run."""
    output = tmp_path_factory.mktemp("reference")
    assert main(arguments(workspace, output)) == 0
    return folder_contents(output)


def assert_same_features(output: Path, reference) -> None:
    manifests, shards = folder_contents(output)
    expected_manifests, expected_shards = reference
    assert manifests == expected_manifests
    assert shards.keys() == expected_shards.keys()
    for name, tensors in expected_shards.items():
        assert shards[name].keys() == tensors.keys()
        for key, tensor in tensors.items():
            assert torch.equal(shards[name][key], tensor), f"{name} {key}"
    assert not [path.name for path in output.iterdir() if path.name.startswith(".")]


def test_resume_after_sigkill(workspace, reference, tmp_path):
    output = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *arguments(workspace, output)], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert len(list(output.glob("*.safetensors"))) == 2  # the second one is not committed
    assert len((output / "part-00000-of-00001.manifest.jsonl").read_text().splitlines()) == 4

    assert main(arguments(workspace, output)) == 0
    assert_same_features(output, reference)


def test_resume_discards_half_written_shard(workspace, reference, tmp_path, monkeypatch, capsys):
    # An interruption while a shard is written leaves a temporary file that the rerun discards. The message names
    # the next step.
    import msd.data.storage as storage

    output = tmp_path / "interrupted"
    save_tensors = storage.atomic_save_tensors
    calls = []

    def interrupted_save(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            path.with_name(f".{path.name}.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        save_tensors(path, tensors, metadata)

    monkeypatch.setattr(storage, "atomic_save_tensors", interrupted_save)
    assert main(arguments(workspace, output)) == 130
    assert "interrupted. Run the same command again to continue" in capsys.readouterr().err
    assert len(list(output.glob(".*.tmp"))) == 1
    monkeypatch.setattr(storage, "atomic_save_tensors", save_tensors)

    assert main(arguments(workspace, output)) == 0
    assert_same_features(output, reference)
