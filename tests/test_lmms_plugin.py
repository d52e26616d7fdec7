"""The lmms-eval plugin: entry-point registration and the local task end to end, with and without a draft."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is optional: pip install --no-deps lmms-eval (see pyproject eval)")

from lmms_eval import evaluator  # noqa: E402
from lmms_eval.models import MODEL_REGISTRY_V2  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from loguru import logger  # noqa: E402

from msd.draft import DraftConfig, DraftModel  # noqa: E402
from msd.errors import MSDError  # noqa: E402
from msd.evaluate.lmms_plugin import LlavaMSD, Qwen2VLMSD, cut_at_stop, sampling_from  # noqa: E402
from msd.evaluate.samples import LOCAL_TASK_FOLDER  # noqa: E402
from msd.targets import adapter_for  # noqa: E402
from tiny_models import build_llava, random_image  # noqa: E402

LIMIT = 3


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmms")
    model, processor = build_llava(seed=0, dtype=torch.float32)
    model.save_pretrained(folder / "target")
    processor.save_pretrained(folder / "target")
    torch.manual_seed(0)
    DraftModel(DraftConfig.for_target(adapter_for(model, processor))).save_pretrained(folder / "draft")
    return folder


def evaluate(model):
    manager = TaskManager("ERROR", include_path=str(LOCAL_TASK_FOLDER))
    return evaluator.simple_evaluate(
        model=model, tasks=["msd_local_vqa", "msd_local_caption"], limit=LIMIT, task_manager=manager,
        log_samples=True, batch_size=1,
    )


def answers(results, task):
    return [sample["filtered_resps"] for sample in results["samples"][task]]


def test_entry_point_registers_models():
    assert MODEL_REGISTRY_V2.get_model_class("llava_msd") is LlavaMSD
    assert MODEL_REGISTRY_V2.get_model_class("qwen2_vl_msd") is Qwen2VLMSD


def test_local_task_same_with_and_without_draft(saved_models):
    plain = LlavaMSD(pretrained=str(saved_models / "target"))
    speculative = LlavaMSD(
        pretrained=str(saved_models / "target"), draft=str(saved_models / "draft"), total_tokens=6, depth=2, tree_top_k=2
    )
    plain_results = evaluate(plain)
    msd_results = evaluate(speculative)

    for task in ("msd_local_vqa", "msd_local_caption"):
        assert len(answers(msd_results, task)) == LIMIT
        assert answers(msd_results, task) == answers(plain_results, task)
        assert msd_results["results"][task] == plain_results["results"][task]
    assert "accuracy,none" in msd_results["results"]["msd_local_vqa"]
    assert "word_f1,none" in msd_results["results"]["msd_local_caption"]
    assert len(speculative.plain_stats) == 2 * LIMIT  # speedup measured on every request
    assert speculative.different == 0
    lengths = [stats.new_tokens for stats in speculative.stats]
    assert max(lengths) <= 64  # the caption task's max_new_tokens
    assert sum(length <= 16 for length in lengths) >= LIMIT  # the vqa task's max_new_tokens

    # The summary goes to lmms-eval's log (loguru) with its numbers filled in.
    messages = []
    sink = logger.add(messages.append, format="{message}")
    try:
        speculative.log_summary()
    finally:
        logger.remove(sink)
    assert f"msd: {2 * LIMIT} requests" in messages[0]
    assert f"0 of {2 * LIMIT} greedy outputs differ" in messages[1]
    assert "%" not in "".join(messages)


def test_lookup_tokens_model_arg(saved_models):
    # lmms-eval passes model args as strings: lookup_tokens=0 turns the n-gram lookup off.
    model = LlavaMSD(pretrained=str(saved_models / "target"), draft=str(saved_models / "draft"), lookup_tokens="0")
    assert model.generator.tree.lookup_tokens == 0


def test_plugin_rejects_wrong_family_batch_and_unknown_args(saved_models):
    with pytest.raises(MSDError, match="llava_msd or qwen2_vl_msd"):
        Qwen2VLMSD(pretrained=str(saved_models / "target"))
    with pytest.raises(MSDError, match="batch_size"):
        LlavaMSD(pretrained=str(saved_models / "target"), batch_size=2)
    # A misspelt model arg stops the run instead of leaving the default tree in place.
    with pytest.raises(MSDError, match="unknown model args: total_token"):
        LlavaMSD(pretrained=str(saved_models / "target"), total_token="10")
    # lmms-eval passes its own max_batch_size when set, and args of lmms-eval's llava model are ignored.
    assert LlavaMSD(pretrained=str(saved_models / "target"), max_batch_size="4", conv_template="vicuna_v1").draft is None


def test_gen_kwargs_mapping():
    assert not sampling_from({"temperature": 0}).do_sample
    assert not sampling_from({}).do_sample
    sampled = sampling_from({"temperature": 0.7, "top_p": 0.9})
    assert sampled.do_sample
    assert sampled.temperature == 0.7
    assert sampled.top_p == 0.9
    assert cut_at_stop("a cat\nmore", ["\n"]) == "a cat"
    assert cut_at_stop("no stop", ["\n\n"]) == "no stop"


def test_answer_stops_at_until(saved_models):
    # The tiny model's outputs contain no newline, so the local tasks never reach their stop strings. Here the stop
    # string is a run of letters from the model's own answer: generation ends there and the answer omits it.
    model = LlavaMSD(pretrained=str(saved_models / "target"))
    image = random_image(48, 40)
    full = model.answer("Describe the image.", [image], {"max_new_tokens": 12})
    assert model.stats[-1].new_tokens == 12
    stop = max(re.findall("[A-Za-z]+", full), key=len)

    answer = model.answer("Describe the image.", [image], {"max_new_tokens": 12, "until": [stop]})
    assert answer == full.split(stop)[0]
    assert model.stats[-1].new_tokens < 12
    assert model.stats[-1].stop_reason == "stop_string"


class DivergingGenerator:
    """Wraps a generator and appends one token to every output, as a broken decoding method would."""

    def __init__(self, generator):
        self.generator = generator

    def generate(self, *args, **kwargs):
        output = self.generator.generate(*args, **kwargs)
        output.token_ids = output.token_ids + [0]
        return output


def test_plain_output_difference_counted(saved_models):
    # The speedup measurement compares the draft's output with plain decoding's, so a differing plain output counts.
    speculative = LlavaMSD(
        pretrained=str(saved_models / "target"), draft=str(saved_models / "draft"), total_tokens=6, depth=2, tree_top_k=2
    )
    speculative.plain = DivergingGenerator(speculative.plain)
    speculative.answer("Describe the image.", [random_image(48, 40)], {"max_new_tokens": 4})
    assert len(speculative.plain_stats) == 1
    assert speculative.different == 1
