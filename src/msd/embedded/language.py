"""The language half of the default target: SmolLM2-135M-Instruct read from its GGUF file as float32."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

logger = logging.getLogger(__name__)


def load_language_model(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF causal LM and its tokenizer, dequantized to float32.

    transformers marks a GGUF-loaded model with a `gguf` quantization config and then refuses `save_pretrained`,
    so the weights are moved into a fresh model of the same class built from the config without that entry.
    The tokenizer keeps the chat template stored in the GGUF metadata.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("reading the language model from %s", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with quiet_gguf_progress():
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config)(**settings)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def quiet_gguf_progress() -> contextlib.AbstractContextManager:
    """Hide the GGUF conversion's progress bar while transformers' progress bars are off (`msd -q`).

    transformers' GGUF reader calls tqdm directly rather than through its own switch, so its module's `tqdm` is
    replaced by one that starts disabled, for the duration of the context only.
    """
    if transformers_logging.is_progress_bar_enabled():
        return contextlib.nullcontext()
    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    if not hasattr(gguf_reader, "tqdm"):  # a transformers version that reads GGUF files another way
        return contextlib.nullcontext()
    return mock.patch.object(gguf_reader, "tqdm", functools.partial(gguf_reader.tqdm, disable=True))
