"""The language half of the default target: SmolLM2-135M-Instruct read from its GGUF file as float32."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config)(**settings)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer
