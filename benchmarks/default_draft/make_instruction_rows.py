"""Write LLaVA-format instruction rows: explanation, advice and short-writing requests about everyday topics.

The chit-chat prompts of `make_text_rows.py` are casual openers, so they rarely make the target explain, list or
describe at length, and a draft trained on them alone learns little of that style. These rows fill that gap. Each prompt is a request template filled with
a topic from `TOPICS`. The topics of the benchmark's text prompts (`benchmarks/default_model/eval_prompts.jsonl`: the
colour of the sky, studying, the bicycle, lakes and seas) are not in the list. As in the other row files, the answers
are placeholders that `msd prepare-data --regenerate` replaces with the target's own answers.

    python benchmarks/default_draft/make_instruction_rows.py --output runs/default-model/instruction-rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

logger = logging.getLogger(__name__)

TEMPLATES = (
    "Explain in a few sentences how {topic} works.",
    "Give three tips about {topic}.",
    "Write a short paragraph about the history of {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Describe {topic} to a ten-year-old in a few sentences.",
)
TOPICS = (
    "the printing press", "a refrigerator", "photosynthesis", "the internet", "a vaccine", "volcanoes", "the moon",
    "rainbows", "electric cars", "a compass", "recycling", "coffee", "the piano", "bread baking", "solar panels",
    "earthquakes", "the human heart", "airplanes", "money", "libraries", "the Olympic Games", "honey bees",
    "a thermometer", "tides", "chess", "public transport", "gardening", "the telephone", "clouds", "sleep",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="rows to write, a .jsonl file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row order (default 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    prompts = [template.format(topic=topic) for topic in TOPICS for template in TEMPLATES]
    random.Random(args.seed).shuffle(prompts)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        for index, prompt in enumerate(prompts):
            row = {"id": f"instruction-{index}", "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": "(answer)"}]}
            handle.write(json.dumps(row) + "\n")
    logger.info("wrote %d rows to %s", len(prompts), args.output)


if __name__ == "__main__":
    main()
