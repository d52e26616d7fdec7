"""lmms-eval hooks of the msd_local tasks: images from `images/`, LLaVA-format prompts and simple text metrics.

lmms-eval loads this file by path (`!function lmms_task.NAME` in the task YAML files), so it imports only the
standard library and Pillow.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

IMAGE_FOLDER = Path(__file__).resolve().parent / "images"
IMAGE_MARKER = "<image>"


def doc_to_visual(doc: dict) -> list[Image.Image]:
    with Image.open(IMAGE_FOLDER / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """Strip the image marker from the question, because lmms-eval models place the image themselves."""
    return doc["conversations"][0]["value"].replace(IMAGE_MARKER, "").strip()


def doc_to_target(doc: dict) -> str:
    return doc["conversations"][1]["value"]


def vqa_docs(dataset):
    return dataset.filter(lambda doc: doc["task"] == "vqa")


def caption_docs(dataset):
    return dataset.filter(lambda doc: doc["task"] == "caption")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def vqa_results(doc: dict, results: list[str]) -> dict:
    """Accuracy 1 when the one-word reference answer is among the answer's words."""
    return {"accuracy": float(doc_to_target(doc).lower() in words(results[0]))}


def caption_results(doc: dict, results: list[str]) -> dict:
    """Word-level F1 between the answer and the reference caption (bag of lowercase words)."""
    predicted, reference = words(results[0]), words(doc_to_target(doc))
    common = sum(min(predicted.count(word), reference.count(word)) for word in set(reference))
    if not common:
        return {"word_f1": 0.0}
    precision, recall = common / len(predicted), common / len(reference)
    return {"word_f1": 2 * precision * recall / (precision + recall)}
