"""The speculative generation loop, plain decoding through the same target calls, and run statistics.

One cycle:

    tree   = drafter.propose(root)                       # root: the last emitted token
    logits = target.forward_tree(tree)                   # one target forward over all n tree nodes
    path, bonus = walk_tree(tree, logits)                # accepted nodes (root first) and the bonus token
    target.keep_accepted(path)                           # cache: prefix + root + accepted nodes
    emit tree.tokens[path[1:]] + [bonus]                 # k accepted tokens + 1 bonus token
    drafter.update(emitted, hidden[path])

Plain decoding is the same loop with a drafter that proposes the root alone, so both paths share prefill, forward,
cache handling and token choice, and their timings compare like with like.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from msd.decoding.drafter import Drafter, MSDDrafter, RootOnlyDrafter
from msd.decoding.tree import TreeParams
from msd.decoding.verify import SamplingParams, TokenChooser, walk_tree
from msd.draft.model import DraftModel
from msd.errors import MSDError
from msd.targets.base import TargetAdapter

logger = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """Counts and timings of one generation. Times are wall-clock seconds."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # decoding forwards, prefill excluded
    accepted_lengths: list[int] = field(default_factory=list)  # accepted draft tokens per cycle, bonus excluded
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0
    stop_reason: str = ""

    @property
    def tau(self) -> float:
        """Tokens per target forward during decoding: mean accepted length plus the bonus token.

        Counted before stop conditions cut the last cycle short; plain decoding gives exactly 1.
        """
        if not self.accepted_lengths:
            return float("nan")
        return 1.0 + sum(self.accepted_lengths) / len(self.accepted_lengths)

    @property
    def decode_time(self) -> float:
        return self.total_time - self.prefill_time

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time else float("nan")

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "tau": self.tau if self.accepted_lengths else None,
            "accepted_lengths": self.accepted_lengths,
            "prefill_time": self.prefill_time,
            "draft_time": self.draft_time,
            "verify_time": self.verify_time,
            "decode_time": self.decode_time,
            "total_time": self.total_time,
            "tokens_per_second": self.tokens_per_second,
            "stop_reason": self.stop_reason,
        }


@dataclass
class GenerationOutput:
    """Generated token ids (prompt excluded), their text when a tokenizer is known, and statistics."""

    token_ids: list[int]
    text: str | None
    stats: GenerationStats


class StopChecker:
    """Decides where generation ends: an EOS token, a stop string, max_new_tokens or the context limit."""

    def __init__(self, eos_token_ids: Sequence[int], stop_strings: Sequence[str], tokenizer, max_new_tokens: int):
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the generated text")
        self.eos = set(eos_token_ids)
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        # Every token decodes to at least one byte, so a new match lies in the last len(stop in UTF-8) tokens.
        # Counting characters would miss stops whose characters take several byte-level tokens, such as emoji.
        self.tail_tokens = max((len(stop.encode("utf-8")) for stop in self.stop_strings), default=0) + 8

    def accept(self, generated: list[int], new_tokens: list[int]) -> tuple[list[int], str]:
        """Append tokens one by one until a stop condition; returns the tokens kept and the stop reason or ""."""
        kept = []
        for token in new_tokens:
            kept.append(token)
            if token in self.eos:
                return kept, "eos"
            if self.stop_strings and self._hits_stop_string(generated + kept):
                return kept, "stop_string"
            if len(generated) + len(kept) >= self.max_new_tokens:
                return kept, "max_new_tokens"
        return kept, ""

    def _hits_stop_string(self, tokens: list[int]) -> bool:
        # Only the tail can hold a new match: the last token's text plus the longest stop string.
        tail = self.tokenizer.decode(tokens[-self.tail_tokens :], skip_special_tokens=False)
        return any(stop in tail for stop in self.stop_strings)


class SpeculativeGenerator:
    """Lossless speculative generation with a target adapter and a drafter.

    >>> generator = SpeculativeGenerator(target, draft)        # draft: a DraftModel, a Drafter, or None for plain
    >>> output = generator.generate(processor(images=..., text=..., return_tensors="pt"), max_new_tokens=256)
    >>> output.text, output.stats.tau
    """

    def __init__(
        self,
        target: TargetAdapter,
        draft: DraftModel | Drafter | None = None,
        tree: TreeParams | None = None,
        tokenizer=None,
    ):
        self.target = target
        if draft is None:
            self.drafter: Drafter = RootOnlyDrafter()
        elif isinstance(draft, DraftModel):
            self.drafter = MSDDrafter(draft, target)
        else:
            self.drafter = draft
        limit = target.max_tree_tokens
        self.tree = tree or TreeParams().capped(limit)  # the default tree fits what the target verifies exactly
        if limit is not None and self.tree.total_tokens > limit and not isinstance(self.drafter, RootOnlyDrafter):
            raise MSDError(
                f"a tree of {self.tree.total_tokens} tokens is too large for this target: its batch-invariant "
                f"bfloat16 CPU kernels verify at most {limit} tokens exactly. Pass --total-tokens {limit} or less "
                "(TreeParams.total_tokens in Python, total_tokens in lmms-eval's --model_args), or load the target "
                "in float32."
            )
        if tokenizer is None and target.processor is not None:
            tokenizer = getattr(target.processor, "tokenizer", target.processor)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        eos_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        generator: torch.Generator | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationOutput:
        """Generate up to `max_new_tokens` tokens for one prompt.

        inputs: what the target's processor returns for one prompt (batch 1). eos_token_ids defaults to the target's
        generation config. on_tokens is called with each cycle's new tokens as soon as they are verified.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        chooser = TokenChooser(sampling or SamplingParams(), generator)
        eos = self.target.eos_token_ids if eos_token_ids is None else list(eos_token_ids)
        stopper = StopChecker(eos, stop_strings, self.tokenizer, max_new_tokens)
        stats = GenerationStats()
        timer = _Timer(self.target.device)
        start = timer.now()

        prefill, state = self.target.prefill(inputs)
        first_token = int(chooser.choose(prefill.logits[None])[0])
        stats.prompt_tokens = state.length
        generated, reason = stopper.accept([], [first_token])
        self._emit(on_tokens, generated)
        if not reason:
            self.drafter.start(prefill, state, first_token)
        stats.prefill_time = timer.now() - start

        while not reason:
            room = self.target.max_positions - state.length  # positions left for the root and its descendants
            if room < 1:
                reason = "context_full"
                logger.warning("stopped at the target's context limit of %d tokens", self.target.max_positions)
                break

            mark = timer.now()
            tree = self.drafter.propose(generated[-1], self.tree, max_depth=room - 1)
            stats.draft_time += timer.now() - mark

            mark = timer.now()
            logits, hidden = self.target.forward_tree(state, tree.tokens, tree.depths, tree.ancestor_mask())
            path, bonus = walk_tree(tree, logits, chooser)
            accepted = torch.tensor(path)
            self.target.keep_accepted(state, len(tree), accepted)
            stats.verify_time += timer.now() - mark
            stats.target_forwards += 1
            stats.accepted_lengths.append(len(path) - 1)

            new_tokens = tree.tokens[accepted[1:]].tolist() + [bonus]
            kept, reason = stopper.accept(generated, new_tokens)
            generated += kept
            self._emit(on_tokens, kept)
            if not reason:
                mark = timer.now()
                self.drafter.update(torch.tensor(new_tokens), hidden[accepted.to(hidden.device)])
                stats.draft_time += timer.now() - mark

        stats.total_time = timer.now() - start
        stats.new_tokens = len(generated)
        stats.stop_reason = reason
        text = self.tokenizer.decode(generated, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationOutput(token_ids=generated, text=text, stats=stats)

    @staticmethod
    def _emit(callback, tokens: list[int]) -> None:
        if callback is not None and tokens:
            callback(tokens)


class _Timer:
    """Wall-clock time that waits for queued GPU work first, so each phase is charged its own kernels."""

    def __init__(self, device: torch.device):
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else None

    def now(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        return time.perf_counter()
