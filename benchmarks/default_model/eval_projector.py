"""Score a default-target build on easy-VQA test questions, with each question's own image and with another image.

    python benchmarks/default_model/eval_projector.py --target "$(msd embedded build)" --questions 300

The second score is the blind baseline: the same questions answered while looking at a different test image, which
measures how much the answers lean on language priors (most questions are yes/no). A projector that passes image
content on scores clearly above it. Answers are greedy, at most 4 new tokens; one counts as correct when its first
word equals the easy-VQA answer, ignoring case and punctuation. Prints a Markdown table by question type.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from msd.embedded.vqa_data import load_easy_vqa
from msd.images import load_image
from msd.prompts import build_inputs

logger = logging.getLogger(__name__)

SHAPES = {"circle", "rectangle", "triangle"}


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "colour"


def first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


@torch.inference_mode()
def answer(model, processor, question: str, image_path: Path) -> str:
    inputs = build_inputs(processor, question, [load_image(image_path)])
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, required=True, help="a folder from `msd embedded build`")
    parser.add_argument("--questions", type=int, default=300, help="test questions, drawn with a fixed seed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model = LlavaForConditionalGeneration.from_pretrained(args.target, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(args.target)
    examples, image_paths = load_easy_vqa("test")
    generator = random.Random(args.seed)
    chosen = generator.sample(examples, args.questions)

    correct, blind, totals = Counter(), Counter(), Counter()
    for example in tqdm(chosen, desc="easy-VQA", unit="question"):
        kind = question_type(example.answer)
        other = (example.image + generator.randrange(1, len(image_paths))) % len(image_paths)
        totals[kind] += 1
        correct[kind] += first_word(answer(model, processor, example.question, image_paths[example.image])) == example.answer
        blind[kind] += first_word(answer(model, processor, example.question, image_paths[other])) == example.answer

    print("| questions | n | own image | another image (blind) |")
    print("| --- | ---: | ---: | ---: |")
    for kind in sorted(totals) + ["all"]:
        n = sum(totals.values()) if kind == "all" else totals[kind]
        right = sum(correct.values()) if kind == "all" else correct[kind]
        wrong_image = sum(blind.values()) if kind == "all" else blind[kind]
        print(f"| {kind} | {n} | {right / n:.3f} | {wrong_image / n:.3f} |")


if __name__ == "__main__":
    main()
