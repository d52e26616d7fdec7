"""Saved tiny Qwen2-VL and Qwen2.5-VL models with transformers' own processors, through msd generate and lmms-eval.

transformers 5 builds Qwen2VLProcessor only with torchvision installed (its video processor needs it), so these tests
run where torchvision is (`pip install torchvision` matching your torch) and are skipped elsewhere. The other
Qwen2-VL tests assemble the processor's inputs themselves (`tests/data_helpers.py`).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision", reason="Qwen2VLProcessor needs torchvision in transformers 5")

from data_helpers import QWEN2_VL_TEMPLATE  # noqa: E402
from tiny_models import TinyQwen2VL, random_image  # noqa: E402
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

from msd.cli import main  # noqa: E402
from msd.decoding import SpeculativeGenerator, TreeParams  # noqa: E402
from msd.draft import DraftConfig, DraftModel  # noqa: E402
from msd.prompts import build_inputs  # noqa: E402
from msd.targets import load_target  # noqa: E402


@pytest.fixture(scope="module", params=["2", "2.5"])
def saved(request, tmp_path_factory):
    """Folders of a tiny Qwen2-VL (or Qwen2.5-VL) with its processor, a random draft for it, and a photo."""
    root = tmp_path_factory.mktemp("qwen")
    tiny = TinyQwen2VL(seed=0, dtype=torch.float32, version=request.param)
    tiny.tokenizer.chat_template = QWEN2_VL_TEMPLATE
    video = Qwen2VLVideoProcessor(patch_size=tiny.image_processor.patch_size, merge_size=2, temporal_patch_size=2)
    processor_class = Qwen2VLProcessor if request.param == "2" else Qwen2_5_VLProcessor
    processor = processor_class(
        image_processor=tiny.image_processor, tokenizer=tiny.tokenizer, video_processor=video,
        chat_template=QWEN2_VL_TEMPLATE,
    )
    tiny.model.save_pretrained(root / "target")
    processor.save_pretrained(root / "target")
    target = load_target(root / "target")
    torch.manual_seed(0)
    DraftModel(DraftConfig.for_target(target)).save_pretrained(root / "draft")
    random_image(96, 72, 3).save(root / "photo.png")
    return root


def test_generate_matches_model_generate(saved):
    # msd's output on the processor's inputs is the model's own greedy generate, token for token.
    target = load_target(saved / "target")
    draft = DraftModel.from_pretrained(saved / "draft")
    inputs = build_inputs(target.processor, "What is in this picture?", [random_image(96, 72, 3)])
    output = SpeculativeGenerator(target, draft, TreeParams(depth=3, top_k=2, total_tokens=6)).generate(
        inputs, max_new_tokens=12, eos_token_ids=[]
    )
    reference = target.model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert output.token_ids == reference[0, inputs["input_ids"].shape[1] :].tolist()


def test_cli_compare(saved, capsys):
    # msd generate --compare on a saved Qwen2-VL folder and an image file.
    code = main([
        "generate", "--target", str(saved / "target"), "--draft", str(saved / "draft"), "--image",
        str(saved / "photo.png"), "--prompt", "Describe the picture.", "--max-new-tokens", "10", "--compare",
        "--no-stream", "--depth", "2", "--tree-top-k", "2", "--total-tokens", "5",
    ])
    captured = capsys.readouterr()
    assert code == 0
    assert "identical to plain decoding: yes" in captured.out + captured.err


def test_lmms_local_task_same_with_and_without_draft(saved):
    # The lmms-eval model qwen2_vl_msd returns the same local-task outputs with the draft as without it.
    pytest.importorskip("lmms_eval", reason="lmms-eval is optional")
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from msd.evaluate.lmms_plugin import Qwen2VLMSD
    from msd.evaluate.samples import LOCAL_TASK_FOLDER

    def evaluate(model):
        manager = TaskManager("ERROR", include_path=str(LOCAL_TASK_FOLDER))
        results = evaluator.simple_evaluate(
            model=model, tasks=["msd_local_vqa"], limit=2, task_manager=manager, log_samples=True, batch_size=1
        )
        return [sample["filtered_resps"] for sample in results["samples"]["msd_local_vqa"]]

    plain = Qwen2VLMSD(pretrained=str(saved / "target"))
    speculative = Qwen2VLMSD(
        pretrained=str(saved / "target"), draft=str(saved / "draft"), total_tokens=5, depth=2, tree_top_k=2
    )
    answers = evaluate(plain)
    assert len(answers) == 2
    assert evaluate(speculative) == answers
    assert speculative.different == 0
