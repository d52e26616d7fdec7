"""Shared pieces of the training tests: a tiny LLaVA target and feature folders written by `prepare_features`."""

from __future__ import annotations

from pathlib import Path

import torch

from msd.data import FeatureDataset, PrepareSettings, prepare_features
from msd.targets import adapter_for
from tiny_models import build_llava, random_image

QUESTIONS = [
    "What is in this image?",
    "Describe the picture in detail, please.",
    "The quick brown fox jumps over the lazy dog.",
    "A cat sits on a red mat near the window.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 make words.",
    "What is the sun doing?",
    "Make sentences with letters.",
    "Where does the cat sit?",
]


#: vocabulary of the word-level tokenizer, so regenerated answers re-tokenize to the ids the target generated
WORDS = sorted({word for text in QUESTIONS + ["A placeholder answer."] for word in text.split()} | {
    f"{index}." for index in range(100)
} | {"Item"})


def tiny_target(seed: int = 0, layers: int = 1):
    """A float32 tiny LLaVA target (16 visual tokens per image) with a word-level tokenizer, in its adapter."""
    model, processor = build_llava(seed=seed, dtype=torch.float32, layers=layers, words=WORDS)
    return adapter_for(model, processor)


def write_rows(folder: Path, count: int, images: bool) -> list[dict]:
    """LLaVA-format rows; with `images`, each row refers to a random PNG written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        question = QUESTIONS[index % len(QUESTIONS)] + f" Item {index}."
        row = {"id": f"{'v' if images else 't'}{index}", "conversations": [
            {"from": "human", "value": ("<image>\n" if images else "") + question},
            {"from": "gpt", "value": "A placeholder answer."},
        ]}
        if images:
            name = f"image{index}.png"
            random_image(48 + index % 3 * 8, 40 + index % 2 * 16, seed=index).save(folder / name)
            row["image"] = name
        rows.append(row)
    return rows


def prepare_folder(target, folder: Path, count: int, kind: str, answer_tokens: int = 24) -> FeatureDataset:
    """Prepare `count` self-distilled samples (answers regenerated greedily by the target) of `kind`."""
    rows = write_rows(folder / "rows", count, images=kind == "vision")
    settings = PrepareSettings(
        output=folder / "features",
        kind=kind,
        image_root=folder / "rows",
        store_dtype="float16",
        regenerate=True,
        regenerate_max_tokens=answer_tokens,
        max_length=256,
        shard_size=64,
    )
    prepare_features(target, rows, settings)
    return FeatureDataset(folder / "features")


def tiny_sources(folder: Path, text_count: int, vision_count: int, answer_tokens: int):
    """A tiny target with a text and a vision feature folder of self-distilled samples: (target, text, vision)."""
    target = tiny_target()
    text = prepare_folder(target, folder / "text", text_count, "text", answer_tokens=answer_tokens)
    vision = prepare_folder(target, folder / "vision", vision_count, "vision", answer_tokens=answer_tokens)
    return target, text, vision
