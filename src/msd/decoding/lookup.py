"""N-gram lookup: continuations copied from earlier in the sequence, grafted onto the draft's tree.

Small models repeat themselves and their prompt: a phrase of the question, the frame of their own previous sentence.
A one-layer draft predicts such repeats only partly. `NgramIndex` records, for every n-gram of 1 to `max_ngram` tokens
in the sequence so far (the prompt's text tokens and the generated ones), where it last occurred. Each cycle the
drafter looks up the longest n-gram that ends the sequence and proposes the tokens that followed its last earlier
occurrence, as prompt lookup decoding does. `msd.decoding.tree.graft_chain` adds them to the draft's tree.

The target verifies grafted tokens like any other node, so the output stays exactly the target's. On the embedded
default model, grafting up to 4 tokens onto the 10-token tree raised tau from 2.84 to 2.97, mostly on answers that
reuse the question's words. That was measured with `benchmarks/default_draft/measure.py` on a 2-core Xeon, over the
validation prompts of `benchmarks/default_draft/tree_validation.jsonl` and three photos.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramIndex:
    """The last occurrence of each n-gram (1 <= n <= max_ngram) of a growing token sequence.

    Only occurrences followed by at least one token are recorded, so the n-grams that end the sequence never match
    themselves.
    """

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be at least 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token in `tokens`

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the sequence."""
        for token in tokens:
            end = len(self.tokens) - 1  # the previous last token now has a successor
            self.tokens.append(int(token))
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self.last_end[tuple(self.tokens[end - n + 1 : end + 1])] = end

    def continuation(self, count: int) -> list[int]:
        """Return `count` tokens that followed the last earlier occurrence of the longest n-gram ending the sequence,
        or [] when no such n-gram occurred before.

        Where that occurrence is close to the end, the copy runs on into its own output, as an LZ77 copy does, so a
        repeating pattern continues: 5 5 5 5 continues with 5 5 5 5.
        """
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            end = self.last_end.get(tuple(self.tokens[-n:]))
            if end is not None:
                return self._copy(end + 1, count)
        return []

    def _copy(self, start: int, count: int) -> list[int]:
        """Copy `count` tokens from position `start` on, reading past the end from the copy itself."""
        length = len(self.tokens)
        copied: list[int] = []
        for position in range(start, start + count):
            copied.append(self.tokens[position] if position < length else copied[position - length])
        return copied
