"""`msd-lmms-eval`: the research pipeline's --use_msd / --msd_model_path flags on lmms-eval's command line."""

import os
import subprocess
import sys

import pytest
import torch

from msd.errors import MSDError
from msd.evaluate.research_flags import translate_arguments


def test_flags_become_draft_model_argument():
    argv = ["--model", "llava_msd", "--model_args", "pretrained=M", "--msd_model_path", "D", "--tasks", "t", "--use_msd"]
    assert translate_arguments(argv) == ["--model", "llava_msd", "--model_args", "pretrained=M,draft=D", "--tasks", "t"]


def test_equals_forms_are_accepted():
    argv = ["--model_args=pretrained=M", "--msd_model_path=D", "--use_msd"]
    assert translate_arguments(argv) == ["--model_args=pretrained=M,draft=D"]


def test_missing_model_args_are_added():
    assert translate_arguments(["--msd_model_path", "D", "--use_msd"]) == ["--model_args", "draft=D"]


def test_without_use_msd_the_draft_is_dropped():
    # The research fork decoded plainly unless --use_msd was given, even with a draft path.
    argv = ["--model_args", "pretrained=M", "--msd_model_path", "D"]
    assert translate_arguments(argv) == ["--model_args", "pretrained=M"]


def test_use_msd_without_draft_rejected():
    with pytest.raises(MSDError, match="--use_msd needs --msd_model_path"):
        translate_arguments(["--model_args", "pretrained=M", "--use_msd"])


def test_msd_model_path_without_value_rejected():
    with pytest.raises(MSDError, match="needs a value"):
        translate_arguments(["--use_msd", "--msd_model_path"])


def test_research_command_runs_local_task(tmp_path):
    # The research invocation, with msd-lmms-eval in place of lmms_eval, on a tiny saved model and the local task.
    pytest.importorskip("lmms_eval")
    from msd.draft import DraftConfig, DraftModel
    from msd.evaluate.samples import LOCAL_TASK_FOLDER
    from msd.targets import adapter_for
    from tiny_models import build_llava

    model, processor = build_llava(seed=0, dtype=torch.float32)
    model.save_pretrained(tmp_path / "target")
    processor.save_pretrained(tmp_path / "target")
    torch.manual_seed(0)
    DraftModel(DraftConfig.for_target(adapter_for(model, processor))).save_pretrained(tmp_path / "draft")

    command = [
        sys.executable, "-m", "msd.evaluate.research_flags",
        "--model", "llava_msd", "--model_args", f"pretrained={tmp_path / 'target'},dtype=float32",
        "--msd_model_path", str(tmp_path / "draft"), "--use_msd",
        "--tasks", "msd_local_vqa", "--include_path", str(LOCAL_TASK_FOLDER), "--limit", "2",
        "--batch_size", "1", "--gen_kwargs", "temperature=0", "--output_path", str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"draft={tmp_path / 'draft'}" in result.stdout + result.stderr
    assert "msd_local_vqa" in result.stdout

    # lmms-eval only logs an evaluation that raised (here a misspelt model arg); the exit status reports it.
    command[command.index("--model_args") + 1] += ",total_token=6"
    failed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert failed.returncode == 1
    assert "unknown model args: total_token" in failed.stderr
    assert "msd-lmms-eval: error: 1 evaluation(s) failed" in failed.stderr
