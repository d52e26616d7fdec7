"""`msd embedded options`: the dtype and tree for the default model on this CPU, as generate/bench options."""

import pytest
import torch

from msd.cli import build_parser, main
from msd.cli.options import tree_from
from msd.embedded import settings
from msd.targets import batch_invariant


@pytest.mark.parametrize("native_bf16", [True, False])
def test_options_follow_cpu_support(native_bf16, monkeypatch, capsys):
    # With native bfloat16 the tree fits the batch-invariant kernels' row block; otherwise float32 and a short chain.
    monkeypatch.setattr(batch_invariant, "supported", lambda device="cpu": native_bf16)
    monkeypatch.setattr(settings, "has_native_bfloat16", lambda: native_bf16)
    assert main(["embedded", "options"]) == 0
    printed = capsys.readouterr().out.split()
    expected = settings.BFLOAT16_OPTIONS if native_bf16 else settings.FLOAT32_OPTIONS
    assert tuple(printed) == expected

    arguments = build_parser().parse_args(["generate", "--target", "t", "--prompt", "p", *printed])
    tree = tree_from(arguments)
    assert arguments.dtype == ("bfloat16" if native_bf16 else "float32")
    assert tree.total_tokens <= batch_invariant.ROWS


@pytest.mark.parametrize("amx", [True, False])
def test_amx_keeps_same_tree(amx, monkeypatch, capsys):
    # A CPU with AVX-512 BF16 runs bfloat16 with the same tree whether or not it has AMX tiles.
    monkeypatch.setattr(batch_invariant, "supported", lambda device="cpu": True)
    monkeypatch.setattr(settings, "has_amx", lambda: amx)
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is None:
        pytest.skip("this torch build has no AVX-512 BF16 probe")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    main(["embedded", "options"])
    assert tuple(capsys.readouterr().out.split()) == settings.BFLOAT16_OPTIONS


def test_later_options_override(capsys):
    # The Makefile puts DEMO_OPTIONS after these, so a later --total-tokens wins.
    main(["embedded", "options"])
    printed = capsys.readouterr().out.split()
    arguments = build_parser().parse_args(["generate", "--target", "t", "--prompt", "p", *printed, "--total-tokens", "2"])
    assert tree_from(arguments).total_tokens == 2


def test_emulated_bfloat16_gets_float32(monkeypatch, capsys):
    # oneDNN emulates bfloat16 on AVX-512 CPUs without BF16 instructions, where float32 is faster, so float32 stays.
    monkeypatch.setattr(batch_invariant, "supported", lambda device="cpu": True)
    monkeypatch.setattr(settings, "has_native_bfloat16", lambda: False)
    main(["embedded", "options"])
    assert tuple(capsys.readouterr().out.split()) == settings.FLOAT32_OPTIONS
