"""Write LLaVA-format image rows for the multimodal stage of the default draft, from real images shipped in packages.

Images come from the Debian package opencv-doc (`apt-get install opencv-doc`: OpenCV's sample pictures) and from
scikit-image's `skimage.data` (installed with msd's embedded extra). The images of the held-out benchmark
(`benchmarks/default_model/eval_prompts.jsonl`) are left out, and so is `skimage.data.cat`, which is the held-out
`chelsea` photo again. Stereo and calibration series keep their first picture only.

Each image gets `--prompts-per-image` requests drawn with a fixed seed from `PROMPTS`. The answers are placeholders:
`msd prepare-data --regenerate` replaces them with the target's own greedy answers. Images are copied (skimage arrays
written as PNG) into `--image-folder`, which is the `--image-root` of prepare-data.

    python benchmarks/default_draft/make_image_rows.py --output runs/default-model/image-rows.jsonl \
        --image-folder runs/default-model/images
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
HELD_OUT = Path(__file__).resolve().parents[1] / "default_model" / "eval_prompts.jsonl"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_SIDE = 48  # smaller files are icons and templates, not pictures
# skimage.data names that are the same picture as a held-out one under another name
ALIASES = {"cat": "chelsea"}
PROMPTS = (
    "Describe this picture in a few sentences.",
    "What do you see in this image? Answer in a few sentences.",
    "Describe this image.",
    "What is shown in this picture? Explain briefly.",
    "Write a short caption for this image, then describe it in two sentences.",
    "What colors and shapes stand out in this image?",
)
#: a second set of requests (`--prompt-set extra`), written to its own rows file so the first set's features stay valid
EXTRA_PROMPTS = (
    "Describe the main object in this picture.",
    "What is happening in this image? Answer in a few sentences.",
    "Give a detailed description of this photo.",
    "Where might this picture have been taken? Explain.",
    "Describe the background of this image.",
    "Tell me about this picture.",
)
PROMPT_SETS = {"main": PROMPTS, "extra": EXTRA_PROMPTS}


def held_out_names(path: Path) -> set[str]:
    """Return the stems of the images that the benchmark uses, which training must not see."""
    names = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            image = json.loads(line).get("image")
            if image:
                names.add(Path(image).stem)
    return names


def opencv_images(folder: Path) -> list[Path]:
    """List the picture files of opencv-doc, one per numbered series (of left01, left02, ... keep left01)."""
    if not folder.is_dir():
        raise SystemExit(f"{folder} not found: install the Debian package opencv-doc (apt-get install opencv-doc).")
    pictures, series = [], set()
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = re.sub(r"\d+$", "", path.stem) or path.stem
        if stem in series:
            continue
        series.add(stem)
        pictures.append(path)
    return pictures


def skimage_images(excluded: set[str]) -> dict[str, Image.Image]:
    """Load the 2-D and RGB pictures of skimage.data that ship in the wheel, skipping entries that need a download."""
    import numpy as np
    import skimage.data

    pictures = {}
    for name in sorted(skimage.data.__all__):
        if name in excluded or ALIASES.get(name) in excluded:
            continue
        loader = getattr(skimage.data, name)
        try:
            array = loader()
        except Exception as error:  # noqa: BLE001 - a loader that needs a download or arguments is just skipped
            logger.debug("skipping skimage.data.%s: %s", name, error)
            continue
        if not isinstance(array, np.ndarray) or array.ndim not in (2, 3) or min(array.shape[:2]) < MIN_SIDE:
            continue
        if array.ndim == 3 and array.shape[2] not in (3, 4):
            continue
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(array.max() - array.min(), 1e-8)).astype(np.uint8)
        pictures[f"skimage-{name}"] = Image.fromarray(array)
    return pictures


def collect_images(image_folder: Path, excluded: set[str]) -> list[str]:
    """Copy or write every picture into `image_folder`; returns the file names, sorted."""
    image_folder.mkdir(parents=True, exist_ok=True)
    names = []
    for path in opencv_images(OPENCV_DATA):
        if path.stem in excluded:
            continue
        with Image.open(path) as image:
            if min(image.size) < MIN_SIDE:
                continue
        name = f"opencv-{path.name}"
        shutil.copyfile(path, image_folder / name)
        names.append(name)
    for stem, image in skimage_images(excluded).items():
        name = f"{stem}.png"
        image.save(image_folder / name)
        names.append(name)
    return sorted(names)


def image_row(row_id: str, image: str, prompt: str) -> dict:
    return {
        "id": row_id,
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": "(answer)"}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="rows to write, a .jsonl file")
    parser.add_argument("--image-folder", type=Path, required=True, help="folder to copy the images into")
    parser.add_argument("--prompts-per-image", type=int, default=3, help="requests per image (default 3)")
    parser.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="main",
                        help="requests to draw from: main or extra, a second set of six (default main)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and row order (default 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    excluded = held_out_names(HELD_OUT)
    names = collect_images(args.image_folder, excluded)
    generator = random.Random(args.seed)
    suffix = "" if args.prompt_set == "main" else f"{args.prompt_set}-"
    rows = [
        image_row(f"{Path(name).stem}-{suffix}{index}", name, prompt)
        for name in names
        for index, prompt in enumerate(generator.sample(PROMPT_SETS[args.prompt_set], args.prompts_per_image))
    ]
    generator.shuffle(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    logger.info("wrote %d rows about %d images to %s", len(rows), len(names), args.output)


if __name__ == "__main__":
    main()
