"""Target adapters, one per model family, and a loader that picks the right one from a checkpoint's config."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

from msd.errors import MSDError
from msd.targets import batch_invariant
from msd.targets.base import PrefillOutput, TargetAdapter, TargetState
from msd.targets.cpu_linear import AUTO, choose_small_batch, use_small_batch_linears
from msd.targets.llava import LlavaAdapter
from msd.targets.qwen2_vl import Qwen2VLAdapter

logger = logging.getLogger(__name__)

ADAPTERS: tuple[type[TargetAdapter], ...] = (LlavaAdapter, Qwen2VLAdapter)
SUPPORTED_MODEL_TYPES = tuple(model_type for adapter in ADAPTERS for model_type in adapter.model_types)

__all__ = [
    "ADAPTERS",
    "SUPPORTED_MODEL_TYPES",
    "LlavaAdapter",
    "PrefillOutput",
    "Qwen2VLAdapter",
    "TargetAdapter",
    "TargetState",
    "adapter_for",
    "check_transformers_format",
    "load_target",
]


#: config keys of the original LLaVA repository's checkpoints, which transformers' LLaVA classes do not read
ORIGINAL_LLAVA_KEYS = ("mm_vision_tower", "mm_projector_type")


def check_transformers_format(config, path) -> None:
    """Raise MSDError for a checkpoint in the original LLaVA repository's format. transformers would load its config
    as a LLaVA config filled with default sizes, and the errors that follow would name those sizes."""
    architectures = getattr(config, "architectures", None) or []
    if any(hasattr(config, key) for key in ORIGINAL_LLAVA_KEYS) or "LlavaLlamaForCausalLM" in architectures:
        raise MSDError(
            f"{path} is in the original LLaVA repository's format (LlavaLlamaForCausalLM, mm_vision_tower), which "
            "transformers' LLaVA classes do not read. Pass its transformers conversion instead, for example "
            "llava-hf/llava-1.5-7b-hf for liuhaotian/llava-v1.5-7b."
        )


def adapter_for(model, processor=None) -> TargetAdapter:
    """Wrap a loaded transformers model in the adapter for its family."""
    model_type = model.config.model_type
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model, processor)
    raise MSDError(
        f"unsupported target model family {model_type!r}. msd supports: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def load_target(
    path: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    cpu_linear_rows: int | str = AUTO,
    invariant_kernels: bool = True,
) -> TargetAdapter:
    """Load a target model and its processor from a local folder or a Hugging Face model id.

    On a CPU with native bfloat16 support, a bfloat16 target switches its language model to batch-invariant kernels
    (`msd.targets.batch_invariant`), so that verifying 8 to 16 tokens costs 1.1 to 1.4 plain steps and rounds each token
    as plain decoding does. With `invariant_kernels=False` such a target is treated as below (pass `cpu_linear_rows=0`
    too for PyTorch's own layers). Otherwise, on a CPU, linear layers switch to
    `SmallBatchLinear` for inputs of at most `cpu_linear_rows` rows, which makes few-token forwards faster on some CPUs
    and slower on others (`msd.targets.cpu_linear`). "auto" times both on this machine and picks the limit, and
    whether a single row runs faster padded to two. 0 keeps PyTorch's layers.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        raise MSDError(f"target folder not found: {path}. Pass a model folder or a Hugging Face model id.")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise MSDError(
            f"cannot load a model config from {path!s}: {error} Check that the folder contains the model's config.json "
            "as saved by save_pretrained, or pass a Hugging Face model id."
        ) from None
    check_transformers_format(config, path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise MSDError(
            f"unsupported target model family {config.model_type!r} in {path!s}. "
            f"msd supports: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    try:
        processor = AutoProcessor.from_pretrained(path)
    except ImportError as error:
        raise MSDError(f"cannot load the processor of {path!s}: {error}") from None
    logger.info("loading target %s (%s)", path, config.model_type)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except SafetensorError as error:
        raise MSDError(
            f"cannot read the weights of {path!s}: a file is truncated or corrupt ({error}). Download or copy the "
            "model again (for the default model: msd embedded build)."
        ) from None
    model = model.to(device)
    adapter = adapter_for(model, processor)
    if model.device.type != "cpu":
        return adapter
    if model.dtype == torch.float16:
        logger.warning(
            "float16 on a CPU runs slowly, and its verification forwards may round differently from plain decoding. "
            "Use bfloat16 on CPUs with native bfloat16 (msd embedded options prints the setting), float32 elsewhere."
        )
    if invariant_kernels and model.dtype == torch.bfloat16 and batch_invariant.supported(model.device):
        batch_invariant.use_batch_invariant_kernels(adapter)
        if cpu_linear_rows not in (AUTO, 0):
            logger.info("cpu_linear_rows=%s not used: this bfloat16 target has batch-invariant kernels", cpu_linear_rows)
        return adapter
    pad_one_row = False
    if cpu_linear_rows == AUTO:
        cpu_linear_rows, pad_one_row = choose_small_batch(model)
    use_small_batch_linears(model, cpu_linear_rows, pad_one_row)
    return adapter
