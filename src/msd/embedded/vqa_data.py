"""Image-question-answer examples for projector training, and the frozen vision features of their images.

The data is easy-VQA (pip package `easy-vqa`, MIT): 64 x 64 images of one coloured shape with short questions about
shape, colour and presence, answered with one word. The vision encoder is frozen during projector training, so its
features are computed once per image and cached in a safetensors file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from msd.errors import MSDError
from msd.images import load_image

logger = logging.getLogger(__name__)

EASY_VQA_REQUIREMENT = "easy-vqa==1.0"


@dataclass(frozen=True)
class VQAExample:
    question: str
    answer: str
    image: int  # row of the image in the feature table


def load_easy_vqa(split: str, max_images: int | None = None) -> tuple[list[VQAExample], list[Path]]:
    """Return the examples of `split` ("train" or "test") and their image files, in image-id order.

    `max_images` keeps only the first images (by id) and their questions, for short runs.
    """
    if importlib.util.find_spec("easy_vqa") is None:
        raise MSDError(f"the easy-VQA dataset is not installed. Install it with: pip install {EASY_VQA_REQUIREMENT}")
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise MSDError(f"unknown easy-VQA split {split!r}; use 'train' or 'test'.")

    kept_ids = sorted(paths)[:max_images] if max_images is not None else sorted(paths)
    row_of = {image_id: row for row, image_id in enumerate(kept_ids)}
    examples = [
        VQAExample(question, answer, row_of[image_id])
        for question, answer, image_id in zip(questions, answers, image_ids)
        if image_id in row_of
    ]
    return examples, [Path(paths[image_id]) for image_id in kept_ids]


def vision_fingerprint(model, processor) -> str:
    """Compute a digest of everything that decides the vision features: encoder config, feature layer, preprocessing."""
    description = {
        "vision_config": model.config.vision_config.to_dict(),
        "vision_feature_layer": model.config.vision_feature_layer,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "image_processor": processor.image_processor.to_dict(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def cached_vision_features(
    model, processor, image_paths: list[Path], cache_file: Path, batch_size: int = 32
) -> torch.Tensor:
    """Return the projector inputs of every image, (N, visual tokens, vision hidden) in float32.

    These are the vision encoder's hidden states at `vision_feature_layer`, after the feature selection, so that
    `multi_modal_projector(features[i])` equals what `LlavaModel.get_image_features` projects for image i. The
    cache is reused when its fingerprint and image count match, and recomputed otherwise. Features are stored in
    float16 to halve the file (their range is far inside float16's).
    """
    fingerprint = vision_fingerprint(model, processor)
    if cache_file.is_file():
        with safe_open(str(cache_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("fingerprint") == fingerprint and metadata.get("images") == str(len(image_paths)):
                logger.info("using cached vision features from %s", cache_file)
                return handle.get_tensor("features").float()
        logger.info("cached vision features in %s are stale; recomputing", cache_file)

    batches = []
    for start in tqdm(range(0, len(image_paths), batch_size), desc="vision features", unit="batch"):
        images = [load_image(path) for path in image_paths[start : start + batch_size]]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.dtype)
        hidden_states = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        selected = hidden_states[model.config.vision_feature_layer]  # (B, 1 + patches, D)
        if model.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]  # drop CLS, as LLaVA's "default" strategy does
        batches.append(selected.to(torch.float16))
    features = torch.cat(batches)  # (N, patches, D)

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_name(cache_file.name + ".partial")
    save_file({"features": features}, str(partial), metadata={"fingerprint": fingerprint, "images": str(len(features))})
    partial.replace(cache_file)
    return features.float()
