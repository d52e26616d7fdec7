"""Write LLaVA-format instruction rows: explanation, advice, comparison and short-writing requests.

The chit-chat prompts of `make_text_rows.py` are casual openers, so they rarely make the target explain, list or
describe at length, and a draft trained on them alone learns little of that style. These rows fill that gap. Each
prompt is a request template filled with an item of `TOPICS`, `ACTIVITIES` or `PAIRS`: 1,488 prompts from the main
templates and 1,448 from the extra ones. The topics of the benchmark's text prompts (`benchmarks/default_model/eval_prompts.jsonl`: the colour of the sky,
studying, the bicycle, lakes and seas) are in none of the lists, but the request styles are alike (why, tips, history,
differences). As in the other row files, the answers are placeholders that `msd prepare-data --regenerate` replaces
with the target's own answers.

    python benchmarks/default_draft/make_instruction_rows.py --output runs/default-model/instruction-rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

logger = logging.getLogger(__name__)

#: requests about a thing or an idea
TOPIC_TEMPLATES = (
    "Explain in a few sentences how {topic} works.",
    "Give three tips about {topic}.",
    "Write a short paragraph about the history of {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Describe {topic} to a ten-year-old in a few sentences.",
    "Why is {topic} important? Answer in a few sentences.",
    "List three interesting facts about {topic}.",
    "What should a beginner know about {topic}?",
)
#: requests about an activity
ACTIVITY_TEMPLATES = (
    "Give three tips for {activity}.",
    "How can someone get better at {activity}? Answer in a few sentences.",
    "What are common mistakes people make when {activity}?",
    "Write a short paragraph about the benefits of {activity}.",
)
#: requests comparing two things
PAIR_TEMPLATES = (
    "What are the main differences between {first} and {second}?",
    "Compare {first} and {second} in a few sentences.",
)
#: a second set of requests (`--template-set extra`), written to its own rows file so the first set's features stay valid
EXTRA_TOPIC_TEMPLATES = (
    "How does {topic} affect everyday life?",
    "Summarize what people should know about {topic} in three sentences.",
    "What is a common misconception about {topic}?",
    "Explain {topic} in simple terms.",
    "Write a short story that involves {topic}.",
    "What questions do people often ask about {topic}? Answer two of them.",
    "How has {topic} changed over the last hundred years?",
    "Write a short encyclopedia entry about {topic}.",
)
EXTRA_ACTIVITY_TEMPLATES = (
    "Write a step-by-step guide to {activity}.",
    "What do you need before {activity}?",
    "Why do people enjoy {activity}?",
)
EXTRA_PAIR_TEMPLATES = (
    "Which is better, {first} or {second}? Explain briefly.",
    "How are {first} and {second} alike?",
)
TEMPLATE_SETS = {
    "main": (TOPIC_TEMPLATES, ACTIVITY_TEMPLATES, PAIR_TEMPLATES),
    "extra": (EXTRA_TOPIC_TEMPLATES, EXTRA_ACTIVITY_TEMPLATES, EXTRA_PAIR_TEMPLATES),
}
TOPICS = (
    "the printing press", "a refrigerator", "photosynthesis", "the internet", "a vaccine", "volcanoes", "the moon",
    "rainbows", "electric cars", "a compass", "recycling", "coffee", "the piano", "bread baking", "solar panels",
    "earthquakes", "the human heart", "airplanes", "money", "libraries", "the Olympic Games", "honey bees",
    "a thermometer", "tides", "chess", "public transport", "gardening", "the telephone", "clouds", "sleep",
    "the microwave oven", "wind turbines", "the steam engine", "glaciers", "the human brain", "antibiotics",
    "the camera", "the printing of books", "democracy", "the stock market", "batteries", "the GPS system",
    "the immune system", "coral reefs", "deserts", "rain forests", "the water cycle", "hurricanes", "lightning",
    "the solar system", "black holes", "stars", "the periodic table", "magnets", "electricity", "the wheel",
    "paper", "glass", "concrete", "bridges", "skyscrapers", "trains", "ships", "submarines", "rockets",
    "satellites", "the radio", "television", "video games", "email", "smartphones", "computers", "robots",
    "artificial intelligence", "3D printing", "the light bulb", "the washing machine", "vacuum cleaners", "clocks",
    "calendars", "maps", "the alphabet", "music notation", "the guitar", "the violin", "drums", "opera", "jazz",
    "painting", "sculpture", "photography", "cinema", "theater", "poetry", "novels", "newspapers", "museums",
    "zoos", "national parks", "farming", "fishing", "wine making", "cheese", "chocolate", "tea", "rice", "potatoes",
    "apples", "bananas", "vegetables", "vitamins", "exercise", "yoga", "swimming", "football", "basketball",
    "tennis", "marathons", "the Tour de France", "the pyramids of Egypt", "the Great Wall of China",
    "the Roman Empire", "ancient Greece", "the Renaissance", "the Industrial Revolution", "the Moon landing",
    "castles", "knights", "pirates", "vikings", "dinosaurs", "fossils", "evolution", "DNA", "cells", "bacteria",
    "viruses", "mushrooms", "trees", "flowers", "cats", "dogs", "horses", "elephants", "whales", "dolphins",
    "sharks", "penguins", "owls", "eagles", "butterflies", "ants", "spiders", "snakes", "frogs", "wolves",
)
ACTIVITIES = (
    "learning a new language", "cooking at home", "saving money", "running a first marathon", "writing an essay",
    "giving a presentation", "taking better photos", "sleeping well", "keeping a houseplant alive",
    "training a puppy", "learning to play the guitar", "starting a garden", "reading more books",
    "preparing for a job interview", "working from home", "traveling on a budget", "making new friends",
    "learning to swim", "drawing portraits", "baking bread", "writing a poem", "playing chess",
    "organizing a small kitchen", "riding a horse", "painting a room", "planning a birthday party",
    "learning to code", "managing time at work", "eating healthy food", "hiking in the mountains",
    "camping with children", "cleaning a house quickly", "staying calm before an exam", "teaching a child to read",
    "choosing a laptop", "driving in the snow", "writing a cover letter", "learning to dance", "fixing a flat tire",
    "caring for an old dog",
)
PAIRS = (
    ("a river", "a canal"), ("a city", "a village"), ("a frog", "a toad"), ("a virus", "a bacterium"),
    ("weather", "climate"), ("a star", "a planet"), ("a crocodile", "an alligator"), ("tea", "coffee"),
    ("a laptop", "a desktop computer"), ("a novel", "a short story"), ("a violin", "a cello"),
    ("a hurricane", "a tornado"), ("a butterfly", "a moth"), ("a rabbit", "a hare"), ("a mountain", "a hill"),
    ("a train", "a tram"), ("an ocean", "a river"), ("a desert", "a steppe"), ("a cat", "a dog"),
    ("a poem", "a song"), ("a museum", "a gallery"), ("an apple", "a pear"), ("a king", "a president"),
    ("a bus", "a car"), ("silver", "gold"), ("a forest", "a jungle"), ("a comet", "an asteroid"),
    ("a whale", "a fish"), ("a bee", "a wasp"), ("a camera", "a phone camera"), ("rain", "snow"),
    ("a town", "a country"), ("a boat", "a ship"), ("a pencil", "a pen"), ("a movie", "a play"),
    ("a doctor", "a nurse"), ("a typewriter", "a computer"), ("a castle", "a palace"), ("a cake", "a pie"),
    ("a dolphin", "a shark"),
)


def make_prompts(template_set: str = "main") -> list[str]:
    """Fill every template of a set with every matching topic, activity or pair."""
    topic_templates, activity_templates, pair_templates = TEMPLATE_SETS[template_set]
    prompts = [template.format(topic=topic) for topic in TOPICS for template in topic_templates]
    prompts += [template.format(activity=activity) for activity in ACTIVITIES for template in activity_templates]
    prompts += [template.format(first=first, second=second) for first, second in PAIRS for template in pair_templates]
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="rows to write, a .jsonl file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row order (default 0)")
    parser.add_argument("--template-set", choices=sorted(TEMPLATE_SETS), default="main",
                        help="request templates: main (1,488 prompts, the default) or extra (1,448 more)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    prompts = make_prompts(args.template_set)
    prefix = "instruction" if args.template_set == "main" else f"instruction-{args.template_set}"
    random.Random(args.seed).shuffle(prompts)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        for index, prompt in enumerate(prompts):
            row = {"id": f"{prefix}-{index}", "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": "(answer)"}]}
            handle.write(json.dumps(row) + "\n")
    logger.info("wrote %d rows to %s", len(prompts), args.output)


if __name__ == "__main__":
    main()
