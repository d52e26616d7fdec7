"""Write LLaVA-format text rows from the Chit-Chat Challenge conversations (`pip install chitchat-dataset==0.9.0`).

Each row's prompt is the first human message of one conversation, its utterances joined by spaces. The reply that
follows it is only a placeholder answer, because `msd prepare-data --regenerate` replaces it with the target's own
greedy answer. Conversations are shuffled with a fixed seed, so the same arguments always give the same rows. The rows after
the training rows in that order go to a second file as held-out prompts for measuring the draft.

    python benchmarks/default_draft/make_text_rows.py --output runs/default-model/text-rows.jsonl --rows 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

logger = logging.getLogger(__name__)

MIN_PROMPT_WORDS = 3


def first_exchange(conversation: dict) -> tuple[str, str] | None:
    """Return the first message and the reply to it (each a sender's consecutive utterances), or None if too short."""
    messages = [" ".join(part["text"].strip() for part in message) for message in conversation["messages"]]
    if len(messages) < 2 or len(messages[0].split()) < MIN_PROMPT_WORDS:
        return None
    return messages[0], messages[1]


def llava_row(row_id: str, prompt: str, answer: str) -> dict:
    return {"id": row_id, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="training rows, a .jsonl file")
    parser.add_argument("--held-out", type=Path, help="held-out rows (default: OUTPUT with a .heldout.jsonl suffix)")
    parser.add_argument("--rows", type=int, default=600, help="training rows (default 600)")
    parser.add_argument("--held-out-rows", type=int, default=20, help="held-out rows (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import chitchat_dataset

    conversations = chitchat_dataset.Dataset()
    keys = sorted(conversations)
    random.Random(args.seed).shuffle(keys)
    rows = []
    for key in keys:
        exchange = first_exchange(conversations[key])
        if exchange is not None:
            rows.append(llava_row(f"chitchat-{key}", *exchange))
        if len(rows) == args.rows + args.held_out_rows:
            break
    held_out_path = args.held_out or args.output.with_suffix(".heldout.jsonl")
    write_jsonl(args.output, rows[: args.rows])
    write_jsonl(held_out_path, rows[args.rows :])
    logger.info("wrote %d rows to %s and %d to %s", args.rows, args.output, len(rows) - args.rows, held_out_path)


if __name__ == "__main__":
    main()
