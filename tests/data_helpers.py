"""Helpers for the data tests: a Qwen2-VL processor stand-in, row files and image files written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import TinyQwen2VL, random_image

#: the chat template shipped with Qwen2-VL-7B-Instruct (ChatML with a default system turn)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TinyQwen2VLProcessor:
    """The parts of Qwen2VLProcessor that msd uses, for TinyQwen2VL.

    transformers 5's Qwen2VLProcessor cannot be built without torchvision (its video processor needs it), so this
    repeats its image expansion: each `<|image_pad|>` becomes one token per merged patch of its image.
    """

    def __init__(self, tiny: TinyQwen2VL):
        self.tiny = tiny
        self.tokenizer = tiny.tokenizer
        self.tokenizer.chat_template = QWEN2_VL_TEMPLATE
        self.chat_template = QWEN2_VL_TEMPLATE
        self.image_processor = tiny.image_processor

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return self.tokenizer.apply_chat_template(
            messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, images=None, text="", return_tensors="pt"):
        batch = {}
        pads = "<|image_pad|>"
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = pixels["pixel_values"]
            batch["image_grid_thw"] = pixels["image_grid_thw"]
            counts = [int(grid.prod()) // 4 for grid in pixels["image_grid_thw"]]
            if text.count(pads) != len(counts):
                raise ValueError(f"{text.count(pads)} image tokens in the text for {len(counts)} images")
            pieces = text.split(pads)
            text = pieces[0] + "".join("<|placeholder|>" * count + piece for count, piece in zip(counts, pieces[1:]))
            text = text.replace("<|placeholder|>", pads)
        input_ids = self.tokenizer(text, return_tensors="pt").input_ids
        batch["input_ids"] = input_ids
        batch["attention_mask"] = torch.ones_like(input_ids)
        batch["mm_token_type_ids"] = (input_ids == self.tiny.image_token_id).int()
        return batch


def write_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    """Write random PNG images, name -> (width, height), under folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, (width, height)) in enumerate(sizes.items()):
        random_image(width, height, seed=seed).save(folder / name)


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows as JSON Lines; a str row is written as it is (for malformed lines)."""
    with open(path, "w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def chat(*turns: str, image=None, row_id: str = "sample") -> dict:
    """A LLaVA-format row whose turns alternate human, gpt, human, ..."""
    row = {"id": row_id, "conversations": [
        {"from": "human" if index % 2 == 0 else "gpt", "value": text} for index, text in enumerate(turns)
    ]}
    if image is not None:
        row["image"] = image
    return row
