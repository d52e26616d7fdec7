"""`msd generate` from the shell on a tiny saved LLaVA model and real image files."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from msd.cli import build_parser, main
from msd.cli.options import check_exact_trees, tree_argument, tree_from
from msd.decoding import TreeParams
from msd.draft import DraftConfig, DraftModel
from msd.targets import adapter_for
from msd.targets.batch_invariant import ROWS
from tiny_models import build_llava, random_image


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaVA target with its processor, a draft for it, and an image, all on disk."""
    root = tmp_path_factory.mktemp("cli")
    model, processor = build_llava(seed=4, dtype=torch.float32)
    model.save_pretrained(root / "target")
    processor.save_pretrained(root / "target")
    torch.manual_seed(0)
    DraftModel(DraftConfig.for_target(adapter_for(model))).save_pretrained(root / "draft")
    random_image(90, 70, seed=5).save(root / "photo.png")
    random_image(50, 120, seed=6).save(root / "scan.jpg")
    return root


def test_generate_compare_from_shell(saved):
    # The real console entry point in a fresh process, with a draft, two images and --compare.
    stats = saved / "stats.json"
    command = [
        sys.executable, "-m", "msd", "generate",
        "--target", str(saved / "target"), "--draft", str(saved / "draft"),
        "--image", str(saved / "photo.png"), "--image", str(saved / "scan.jpg"),
        "--prompt", "Compare <image> with <image>.", "--max-new-tokens", "12",
        "--depth", "3", "--tree-top-k", "3", "--total-tokens", "8", "--compare", "--stats-json", str(stats),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert "identical to plain decoding: yes" in result.stderr
    assert "tau" in result.stderr
    report = json.loads(stats.read_text())
    assert report["identical"] is True
    assert report["msd"]["new_tokens"] == report["plain"]["new_tokens"] == 12
    assert result.stdout.strip()  # the streamed output text


def test_generate_sampling(saved, capsys):
    code = main([
        "generate", "--target", str(saved / "target"), "--image", str(saved / "photo.png"),
        "--prompt", "What is it?", "--max-new-tokens", "5", "--temperature", "0.8", "--top-p", "0.9",
        "--top-k", "20", "--no-stream",
    ])
    assert code == 0
    err = capsys.readouterr().err
    assert "[plain] 5 tokens" in err
    assert "decoding 0." in err  # plain decoding drafts nothing, so its time is not called verification
    assert "verification" not in err


def test_sampling_compare_reports_identity(saved, capsys):
    # Under sampling, --compare still prints whether the outputs matched, with a note that a difference is allowed.
    code = main([
        "generate", "--target", str(saved / "target"), "--draft", str(saved / "draft"), "--image",
        str(saved / "photo.png"), "--prompt", "What is it?", "--max-new-tokens", "5", "--temperature", "0.8",
        "--seed", "3", "--no-stream", "--compare",
    ])
    assert code == 0
    err = capsys.readouterr().err
    assert re.search(r"identical to plain decoding: (yes|no) \(when sampling", err)
    assert "a difference is not an error" in err


def test_empty_prompt_rejected(saved, capsys):
    # A blank --prompt (say, an unset shell variable) stops before any model loads.
    code = main(["generate", "--target", str(saved / "missing-target"), "--prompt", "  "])
    assert code == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_plain_stats_without_acceptance(saved, capsys):
    # Plain decoding drafts nothing, so its statistics line has no accepted length.
    main(["generate", "--target", str(saved / "target"), "--prompt", "hi", "--max-new-tokens", "3", "--no-stream"])
    err = capsys.readouterr().err
    assert "[plain] 3 tokens" in err
    assert "accepted length" not in err


def test_float16_on_cpu_warns(saved, caplog):
    # float16 on a CPU is slow and may round verification differently, so loading warns and names the better dtypes.
    code = main([
        "generate", "--target", str(saved / "target"), "--prompt", "hi", "--max-new-tokens", "2", "--no-stream",
        "--dtype", "float16",
    ])
    assert code == 0
    assert "float16 on a CPU runs slowly" in caplog.text


def test_missing_image_is_clear_error(saved, capsys):
    code = main([
        "generate", "--target", str(saved / "target"), "--image", str(saved / "missing.png"), "--prompt", "hi",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert "image file not found" in err
    assert "missing.png" in err
    assert "Traceback" not in err


def test_placeholder_mismatch_is_clear_error(saved, capsys):
    code = main([
        "generate", "--target", str(saved / "target"), "--image", str(saved / "photo.png"),
        "--prompt", "<image> vs <image>",
    ])
    assert code == 2
    assert "2 <image> placeholders but 1 image was given" in capsys.readouterr().err


def test_bad_draft_is_clear_error(saved, tmp_path, capsys):
    code = main([
        "generate", "--target", str(saved / "target"), "--draft", str(tmp_path), "--prompt", "hi",
    ])
    assert code == 2
    assert "no draft config" in capsys.readouterr().err


def test_missing_draft_fails_before_target_load(tmp_path, capsys):
    # the draft folder is checked first, so a typo in it is reported without loading the (here missing) target
    code = main([
        "generate", "--target", str(tmp_path / "no-target"), "--draft", str(tmp_path / "no-draft"), "--prompt", "hi",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert f"draft folder not found: {tmp_path / 'no-draft'}" in err
    assert "Pass the folder written by msd train or msd convert" in err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--depth", "0"], "--depth must be at least 1"),
        (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--temperature", "nan"], "--temperature must be 0 (greedy) or a positive finite number, got nan"),
        (["--temperature", "inf"], "--temperature must be 0 (greedy) or a positive finite number, got inf"),
        (["--stop", ""], "--stop is empty"),
        (["--device", "foo"], "invalid --device 'foo'"),
        (["--lookup-tokens", "-1"], "--lookup-tokens must be 0 (off) or positive, got -1"),
    ],
)
def test_bad_option_error_names_it(saved, capsys, options, message):
    # Each invalid setting exits with status 2 and a message that names the option and the value.
    code = main(["generate", "--target", str(saved / "target"), "--prompt", "hi", *options])
    assert code == 2
    assert message in capsys.readouterr().err


def test_stats_json_bad_path_fails_early(saved, tmp_path, capsys):
    # A folder that does not exist, or a folder in place of a file, is rejected before the target loads.
    missing = tmp_path / "no-folder" / "stats.json"
    code = main(["generate", "--target", str(tmp_path / "no-target"), "--prompt", "hi", "--stats-json", str(missing)])
    assert code == 2
    assert f"folder {missing.parent} not found" in capsys.readouterr().err
    code = main(["generate", "--target", str(tmp_path / "no-target"), "--prompt", "hi", "--stats-json", str(tmp_path)])
    assert code == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_rejected(saved, capsys):
    code = main(["generate", "--target", str(saved / "target"), "--prompt", "hi", "--device", "cuda:0"])
    assert code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_one_token_stats_json_valid(saved, tmp_path, capsys):
    # A one-token output has no decoding forward: tau is null in the JSON file, which stays strict JSON, and n/a.
    stats = tmp_path / "stats.json"
    code = main([
        "generate", "--target", str(saved / "target"), "--draft", str(saved / "draft"), "--prompt", "hi",
        "--max-new-tokens", "1", "--no-stream", "--compare", "--stats-json", str(stats),
    ])
    assert code == 0
    assert "tau nan" not in capsys.readouterr().err
    report = json.loads(stats.read_text())
    assert report["msd"]["tau"] is None
    assert report["plain"]["tau"] is None


def test_truncated_target_weights_clear_error(saved, tmp_path, capsys):
    # A cut-off safetensors file of the target gives an error naming the folder, not a traceback.
    import shutil

    broken = tmp_path / "broken-target"
    shutil.copytree(saved / "target", broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    code = main(["generate", "--target", str(broken), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot read the weights of {broken}" in err
    assert "Traceback" not in err


def test_lookup_tokens_reach_tree():
    # --lookup-tokens sets the tree's lookup budget, and 0 turns the lookup off.
    arguments = build_parser().parse_args(["generate", "--target", "t", "--prompt", "p", "--lookup-tokens", "0"])
    assert tree_from(arguments).lookup_tokens == 0


def test_draft_for_other_target_is_clear_error(saved, tmp_path, capsys):
    # A draft built for a Qwen2-VL target must be rejected by name before any decoding starts.
    from tiny_models import TinyQwen2VL

    qwen = TinyQwen2VL(seed=0, dtype=torch.float32)
    DraftModel(DraftConfig.for_target(adapter_for(qwen.model))).save_pretrained(tmp_path / "qwen-draft")
    code = main([
        "generate", "--target", str(saved / "target"), "--draft", str(tmp_path / "qwen-draft"), "--prompt", "hi",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit" in err
    assert "Traceback" not in err


def test_tree_argument_parses_and_rejects():
    # The benchmark scripts' --tree/--trees values: a malformed one is an argparse error naming the expected form.
    assert tree_argument("3,1,4") == TreeParams(depth=3, top_k=1, total_tokens=4)
    with pytest.raises(argparse.ArgumentTypeError, match="depth,top_k,total_tokens"):
        tree_argument("2,1")


def test_exact_tree_check(capsys):
    # The benchmark scripts stop on a bfloat16 tree larger than the batch-invariant kernels verify exactly.
    parser = argparse.ArgumentParser(prog="measure.py")
    check_exact_trees(parser, [TreeParams(3, 4, ROWS)], "--trees")
    with pytest.raises(SystemExit):
        check_exact_trees(parser, [TreeParams(3, 4, 10), TreeParams(3, 4, ROWS + 4)], "--trees")
    assert f"--trees: bfloat16 trees may hold at most {ROWS} tokens, got [{ROWS + 4}]" in capsys.readouterr().err


def test_sigterm_unwinds_like_ctrl_c(monkeypatch, capsys):
    # SIGTERM during a command raises KeyboardInterrupt inside it, so clean-up runs, and the handler is restored.
    import os
    import signal
    import time

    import msd.cli.embedded as embedded

    cleaned = []

    def terminated_command(arguments):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(embedded, "run_options", terminated_command)
    assert main(["embedded", "options"]) == 130
    assert cleaned == [True]
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
