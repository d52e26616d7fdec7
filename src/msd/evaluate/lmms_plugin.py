"""lmms-eval model classes `llava_msd` and `qwen2_vl_msd`: evaluation with msd's speculative decoding.

msd registers them through lmms-eval's entry-point group `lmms_eval.models` (see pyproject.toml), so after
`pip install msd[eval]` they are available by name:

    lmms-eval --model llava_msd --model_args pretrained=llava-hf/llava-1.5-7b-hf,draft=DRAFT_FOLDER \\
        --tasks chartqa --batch_size 1

Model args: pretrained (target), draft (MSD draft folder; omit for plain decoding through the same code, which
measures the baseline), device, dtype, total_tokens (default 48, or on a bfloat16 CPU target the largest tree its
batch-invariant kernels verify exactly, less lookup_tokens), depth, tree_top_k, lookup_tokens (default 4, 0 = off),
and measure_speedup (default true: with a draft, each
request is also decoded plainly, interleaved, to time the speedup and check identical greedy output).
Each task's gen_kwargs are honoured: max_new_tokens, until (stop strings, cut from the answer as lmms-eval expects),
temperature (0 = greedy), top_p and top_k. At the end the model logs tau and, when measured, the speedup.
"""

from __future__ import annotations

import statistics

import torch
from lmms_eval.api.model import lmms
from loguru import logger  # lmms-eval logs through loguru, so the summary appears in its log
from tqdm import tqdm

from msd.decoding import SamplingParams, SpeculativeGenerator, TreeParams
from msd.draft import DraftModel
from msd.errors import MSDError
from msd.prompts import build_inputs
from msd.targets import load_target
from msd.targets.batch_invariant import request_strict_mkl

# lmms-eval imports this module before it runs a model, so MKL has usually not started yet.
request_strict_mkl()

DEFAULT_MAX_NEW_TOKENS = 128
#: model args of lmms-eval's own llava and qwen2_vl models, ignored here with a warning: msd takes the chat template
#: and the attention from the checkpoint
IGNORED_MODEL_ARGS = {"conv_template", "model_name", "device_map", "attn_implementation", "use_flash_attention_2"}
TRUE_WORDS = ("1", "true", "yes")


def manifests():
    """Entry point for lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id="llava_msd", simple_class_path="msd.evaluate.lmms_plugin.LlavaMSD"),
        ModelManifest(model_id="qwen2_vl_msd", simple_class_path="msd.evaluate.lmms_plugin.Qwen2VLMSD"),
    ]


class MSDModel(lmms):
    """Shared by both families: loads the target with msd's adapter and decodes one request at a time."""

    model_types: tuple[str, ...] = ()

    def __init__(
        self,
        pretrained: str,
        draft: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        total_tokens: int | str | None = None,
        depth: int = 5,
        tree_top_k: int = 8,
        lookup_tokens: int | str = TreeParams.lookup_tokens,
        measure_speedup: bool | str = True,
        batch_size: int | str = 1,
        max_batch_size: int | str | None = None,  # lmms-eval's option, unused: msd decodes one request at a time
        seed: int = 0,
        **unknown,
    ):
        super().__init__()
        ignored = sorted(set(unknown) & IGNORED_MODEL_ARGS)
        if ignored:
            logger.warning(f"ignoring model args of other LLaVA and Qwen2-VL plugins: {', '.join(ignored)}")
        unknown = sorted(set(unknown) - IGNORED_MODEL_ARGS)
        if unknown:
            raise MSDError(
                f"unknown model args: {', '.join(unknown)}. llava_msd and qwen2_vl_msd take pretrained, draft, "
                "device, dtype, total_tokens, depth, tree_top_k, lookup_tokens, measure_speedup, batch_size, seed "
                "and lmms-eval's max_batch_size."
            )
        if int(batch_size) != 1:
            raise MSDError(f"msd decodes one request at a time; got batch_size={batch_size}. Use --batch_size 1.")
        self.target = load_target(pretrained, dtype=dtype, device=device)
        if self.target.config.model_type not in self.model_types:
            raise MSDError(
                f"{pretrained} is a {self.target.config.model_type!r} model, but this lmms-eval model serves "
                f"{', '.join(self.model_types)}. Pick the matching model name (llava_msd or qwen2_vl_msd)."
            )
        if total_tokens is None:
            default = TreeParams(lookup_tokens=int(lookup_tokens))
            total_tokens = default.capped(self.target.max_tree_tokens).total_tokens
        tree = TreeParams(
            depth=int(depth), top_k=int(tree_top_k), total_tokens=int(total_tokens), lookup_tokens=int(lookup_tokens)
        )
        self.draft = DraftModel.from_pretrained(draft) if draft else None
        self.generator = SpeculativeGenerator(self.target, self.draft, tree)
        self.plain = SpeculativeGenerator(self.target, None, tree) if self.draft is not None else self.generator
        self.measure_speedup = self.draft is not None and str(measure_speedup).lower() in TRUE_WORDS
        self.seed = int(seed)
        self.stats = []  # GenerationStats of every request
        self.plain_stats = []  # with measure_speedup: plain decoding's stats of the same requests
        self.different = 0  # greedy requests whose speculative output differs from plain decoding's

    def generate_until(self, requests) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="msd generating", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            answers.append(self.answer(context, [image.convert("RGB") for image in images or []], dict(gen_kwargs)))
        self.log_summary()
        return answers

    def answer(self, context: str, images: list, gen_kwargs: dict) -> str:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        sampling = sampling_from(gen_kwargs)
        inputs = build_inputs(self.target.processor, context, images)

        output = self.run(self.generator, inputs, max_new_tokens, sampling, until)
        self.stats.append(output.stats)
        if self.measure_speedup:
            baseline = self.run(self.plain, inputs, max_new_tokens, sampling, until)
            self.plain_stats.append(baseline.stats)
            if not sampling.do_sample and baseline.token_ids != output.token_ids:
                self.different += 1
        return cut_at_stop(output.text, until)

    def run(self, generator, inputs, max_new_tokens, sampling, until):
        seed = torch.Generator(device=self.target.device).manual_seed(self.seed)
        return generator.generate(inputs, max_new_tokens, sampling=sampling, stop_strings=until, generator=seed)

    def log_summary(self) -> None:
        if not self.stats:
            return
        tokens = sum(stats.new_tokens for stats in self.stats)
        seconds = sum(stats.total_time for stats in self.stats)
        accepted = [length for stats in self.stats for length in stats.accepted_lengths]
        tau = 1 + sum(accepted) / len(accepted) if accepted else float("nan")
        # loguru formats with str.format, not %-style arguments.
        logger.info(f"msd: {len(self.stats)} requests, {tokens} tokens, {tokens / seconds:.1f} tokens/s, tau {tau:.2f}")
        if self.plain_stats:
            ratios = [plain.total_time / own.total_time for plain, own in zip(self.plain_stats, self.stats)]
            total_ratio = sum(stats.total_time for stats in self.plain_stats) / seconds
            logger.info(
                f"msd: end-to-end speedup over plain decoding {statistics.fmean(ratios):.2f}x (mean of per-request "
                f"ratios), {total_ratio:.2f}x (ratio of totals); {self.different} of {len(ratios)} greedy outputs "
                "differ from plain decoding"
            )

    def loglikelihood(self, requests):
        raise NotImplementedError("msd models only generate; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("msd models do not support multi-round generation yet")


class LlavaMSD(MSDModel):
    model_types = ("llava",)


class Qwen2VLMSD(MSDModel):
    # NOTE: tests/test_qwen2_vl_saved.py runs it end to end where torchvision is installed (Qwen2-VL's processor
    # needs it); the CPU test setup lacks torchvision and skips that file.
    model_types = ("qwen2_vl", "qwen2_5_vl")


def sampling_from(gen_kwargs: dict) -> SamplingParams:
    """Greedy decoding at temperature 0 (lmms-eval's default for most tasks), else sampling."""
    temperature = float(gen_kwargs.get("temperature") or 0)
    do_sample = temperature > 0 and gen_kwargs.get("do_sample", True) is not False
    return SamplingParams(
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_p=float(gen_kwargs.get("top_p") or 1.0),
        top_k=int(gen_kwargs.get("top_k") or 0),
    )


def cut_at_stop(text: str, until: list[str]) -> str:
    """Cut the text at the first stop string, which lmms-eval expects removed."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
