"""Conversion of research-format (EAGLE-style) MSD draft checkpoints into msd's draft format.

A research checkpoint is a folder with `config.json` (a LLaMA- or Qwen2-style config of the single draft layer) and
its weights in `model.safetensors` or `pytorch_model.bin`:

    fc.weight, fc.bias          the fusion layer, 2H -> H
    layers.0.<name>             the decoder layer (self_attn.*, mlp.*, post_attention_layernorm.weight and, except
                                in EAGLE-1/2 checkpoints, input_layernorm.weight)
    embed_tokens.weight         a copy of the target's embedding; msd borrows the target's own, so it is only checked

Pickled `pytorch_model.bin` files are read with `torch.load(weights_only=True)`, which loads tensors and plain
containers but never runs code from the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from msd.draft.config import DraftConfig
from msd.draft.model import DraftModel
from msd.errors import MSDError

logger = logging.getLogger(__name__)

RESEARCH_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RESEARCH_LAYER_PREFIX = "layers.0."
EMBEDDING_KEY = "embed_tokens.weight"
INPUT_NORM_KEY = RESEARCH_LAYER_PREFIX + "input_layernorm.weight"
#: config.json entries that must equal the target language model's
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def weight_name_map(draft: DraftModel) -> dict[str, str]:
    """msd weight name -> research weight name, for every weight `draft` stores.

    A one-layer msd draft names its fusion and decoder-layer weights as the research checkpoints do (`fc.*`,
    `layers.0.*`), so the map is the identity. It stays the single place where the two formats meet.
    """
    return {name: name for name in draft.state_dict()}


def read_research_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Load the weights of a research checkpoint folder onto the CPU."""
    for file_name in RESEARCH_WEIGHT_FILES:
        path = folder / file_name
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            return load_file(str(path))
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError and RuntimeError variants for unsafe or bad files
            raise MSDError(f"cannot read {path} as plain weights: {error}") from None
    raise MSDError(f"no weights in {folder}: expected one of {', '.join(RESEARCH_WEIGHT_FILES)}.")


def convert_checkpoint(
    source: str | Path, output: str | Path, target_config, decouple_visual: bool = True
) -> DraftModel:
    """Convert the research checkpoint in `source` for the target whose transformers config is `target_config`,
    save it to `output` with `save_pretrained` in the checkpoint's precision and return the loaded draft.

    Missing weights, unknown weights and shapes that do not fit the target raise MSDError.
    """
    source = Path(source)
    if not source.is_dir():
        raise MSDError(
            f"checkpoint folder not found: {source}. msd convert reads a local folder: download the research "
            "checkpoint first (for example with huggingface_hub's `hf download REPO --local-dir DIR`) and pass DIR."
        )
    config_path = source / "config.json"
    if not config_path.is_file():
        raise MSDError(f"no config.json in {source}. Pass the folder of a research-format MSD checkpoint.")
    try:
        research_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise MSDError(f"invalid JSON in {config_path}: {error}") from None
    if research_config.get("msd_draft"):
        raise MSDError(f"{source} is already an msd draft; pass it to `msd generate --draft` directly.")
    text_config = target_config.get_text_config()
    _check_shapes(research_config, text_config, source)

    weights = read_research_weights(source)
    draft_config = DraftConfig(
        target_model_type=target_config.model_type,
        text_config=text_config.to_dict(),
        decouple_visual=decouple_visual,
        input_layernorm=INPUT_NORM_KEY in weights,
    )
    draft = DraftModel(draft_config)
    mapping = weight_name_map(draft)

    missing = sorted(research for research in mapping.values() if research not in weights)
    known = set(mapping.values()) | {EMBEDDING_KEY}
    unknown = sorted(name for name in weights if name not in known and not name.endswith("rotary_emb.inv_freq"))
    if missing or unknown:
        raise MSDError(
            f"{source} is not an MSD draft checkpoint this target's layer family can read: missing weights "
            f"{missing or 'none'}, unknown weights {unknown or 'none'}."
        )
    _check_embedding(weights.get(EMBEDDING_KEY), text_config, source)

    state = {name: weights[research] for name, research in mapping.items()}
    expected_shapes = {name: tuple(tensor.shape) for name, tensor in draft.state_dict().items()}
    wrong = [f"{name} {tuple(state[name].shape)} (expected {shape})" for name, shape in expected_shapes.items()
             if tuple(state[name].shape) != shape]
    if wrong:
        raise MSDError(f"weights in {source} do not fit the target: " + "; ".join(wrong) + ".")
    draft.load_state_dict(state, strict=True)
    # Research drafts are stored in one precision, often float16. A checkpoint that mixes precisions keeps float32.
    precisions = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
    saved_dtype = precisions.pop() if len(precisions) == 1 else torch.float32
    draft.save_pretrained(output, dtype=saved_dtype)
    logger.info(
        "converted %s to %s (%d weights in %s, input layer norm: %s)",
        source, output, len(state), saved_dtype, draft_config.input_layernorm,
    )
    return draft.eval()


def _check_shapes(research_config: dict, text_config, source: Path) -> None:
    problems = [
        f"{name} {research_config[name]} (target: {getattr(text_config, name)})"
        for name in SHAPE_KEYS
        if name in research_config and research_config[name] != getattr(text_config, name)
    ]
    if problems:
        raise MSDError(
            f"the checkpoint in {source} was trained for a different target: " + "; ".join(problems) + ". "
            "Convert it with the target it was trained for."
        )


def _check_embedding(embedding: torch.Tensor | None, text_config, source: Path) -> None:
    if embedding is None:
        return
    expected = (text_config.vocab_size, text_config.hidden_size)
    if tuple(embedding.shape) != expected:
        raise MSDError(
            f"the embedding in {source} has shape {tuple(embedding.shape)}, the target's is {expected}: the "
            "checkpoint was trained for a different target."
        )
