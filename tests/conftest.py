"""Shared fixtures: tiny LLaVA and Qwen2-VL targets in float64.

float64 keeps the tree forward's rounding differences (about 1e-7 in float32) far below any gap between the top two
logits, so a greedy comparison token for token cannot fail on a near-tie.
"""

import pytest
import torch

from msd.targets import adapter_for
from msd.targets.batch_invariant import request_strict_mkl
from tiny_models import TinyQwen2VL, build_llava, llava_inputs, random_image


# The test process multiplies on the CPU long before the bfloat16 tests load their targets, so MKL's strict
# reproducible mode has to be requested before its first call.
request_strict_mkl()


class Family:
    """A tiny target with a way to build processor inputs for text and images."""

    def __init__(self, name, model, make_inputs):
        self.name = name
        self.model = model
        self.make_inputs = make_inputs
        self.target = adapter_for(model)

    def reference(self, inputs, max_new_tokens, eos_token_id=None):
        """Greedy output of the model's own `generate`, prompt removed."""
        options = {"max_new_tokens": max_new_tokens, "do_sample": False}
        if eos_token_id is not None:
            options["eos_token_id"] = eos_token_id
        output = self.model.generate(**inputs, **options)
        return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="session")
def llava_family():
    model, processor = build_llava(seed=0)
    family = Family("llava", model, lambda text, images: llava_inputs(processor, text, images))
    family.processor = processor
    return family


@pytest.fixture(scope="session")
def qwen_family():
    tiny = TinyQwen2VL(seed=0)
    family = Family("qwen2_vl", tiny.model, tiny.inputs)
    family.tiny = tiny
    return family


@pytest.fixture(params=["llava", "qwen2_vl"])
def family(request, llava_family, qwen_family):
    return llava_family if request.param == "llava" else qwen_family


@pytest.fixture
def images():
    return [random_image(80, 60, 1), random_image(120, 90, 2), random_image(40, 150, 3)]


def pytest_configure(config):
    torch.set_num_threads(max(1, torch.get_num_threads()))
