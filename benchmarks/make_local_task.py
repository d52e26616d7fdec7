"""Regenerate the local evaluation task (`src/msd/evaluate/local_task/`) from scikit-image's bundled photos.

The images are `skimage.data` photos (public domain or CC0, see each function's docstring in scikit-image), saved as
small JPEGs. Each row of `samples.jsonl` is a LLaVA-format conversation plus msd's `task` and `stop` fields. Short
answers were written by hand for what each photo shows; captions are scikit-image's own one-line descriptions.

    pip install scikit-image
    python benchmarks/make_local_task.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

TASK_FOLDER = Path(__file__).resolve().parent.parent / "src" / "msd" / "evaluate" / "local_task"
MAX_SIDE = 320  # pixels; keeps the whole set at a few hundred KB
JPEG_QUALITY = 80

SHORT_ANSWER = "Answer with one word."
VQA = [
    ("chelsea", "What animal is in this picture?", "cat"),
    ("astronaut", "What is the job of the person in this photo?", "astronaut"),
    ("coffee", "What drink is in the cup?", "coffee"),
    ("rocket", "What is being launched in this photo?", "rocket"),
    ("coins", "What kind of objects are shown?", "coins"),
    ("moon", "The surface of which celestial body is shown?", "moon"),
    ("clock", "What object is shown in this image?", "clock"),
    ("horse", "Which animal's silhouette is this?", "horse"),
    ("brick", "What is this wall made of?", "brick"),
    ("camera", "What device is the man looking into?", "camera"),
]
CAPTIONED = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "page", "retina"]
CAPTION_PROMPT = "Describe this image in one sentence."


def save_image(name: str) -> str:
    pixels = getattr(data, name)()
    if pixels.dtype != np.uint8:
        pixels = (pixels * 255).astype(np.uint8) if pixels.max() <= 1 else pixels.astype(np.uint8)
    image = Image.fromarray(pixels).convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    file_name = f"{name}.jpg"
    image.save(TASK_FOLDER / "images" / file_name, quality=JPEG_QUALITY)
    return file_name


def conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def build_rows() -> list[dict]:
    rows = []
    for name, question, answer in VQA:
        rows.append({
            "id": f"vqa-{name}",
            "task": "vqa",
            "image": save_image(name),
            "conversations": conversation(f"{question} {SHORT_ANSWER}", answer),
            "stop": ["\n"],
        })
    for name in CAPTIONED:
        caption = getattr(data, name).__doc__.strip().splitlines()[0]
        rows.append({
            "id": f"caption-{name}",
            "task": "caption",
            "image": save_image(name),
            "conversations": conversation(CAPTION_PROMPT, caption),
            "stop": ["\n\n"],
        })
    return rows


def main() -> None:
    (TASK_FOLDER / "images").mkdir(parents=True, exist_ok=True)
    rows = build_rows()
    with open(TASK_FOLDER / "samples.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    total = sum(path.stat().st_size for path in (TASK_FOLDER / "images").iterdir())
    print(f"wrote {len(rows)} samples and {total / 1024:.0f} KB of images to {TASK_FOLDER}")


if __name__ == "__main__":
    main()
