"""Self-distillation: replace the assistant turns of conversations with the target's own greedy answers.

Several conversations are answered per `generate` call. Their prompts are padded on the left to one length, so each
row's last prompt token sits in the last column and its new tokens follow in step with the other rows'. Per-token
inputs (`input_ids`, `attention_mask` and any other `(1, T)` tensor the processor returns) are padded. Per-image inputs
(`pixel_values`, Qwen2-VL's `image_grid_thw`) are concatenated in row order, which is the order of the image tokens in
the padded batch.

Conversations with several assistant turns are answered turn by turn: the second answer's prompt contains the first
answer, so every round of `generate` calls answers the next pending turn of each conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import GenerationConfig

from msd.data.conversations import Conversation, ConversationEncoder, RowError, SkipReason
from msd.targets.base import TargetAdapter

logger = logging.getLogger(__name__)


@dataclass
class PendingTurn:
    """The next assistant turn of one conversation to answer."""

    row: int  # position of the conversation in the regenerate() input
    turn: int  # index of the assistant message in the conversation
    inputs: dict[str, torch.Tensor]  # processor inputs of the messages before it, with the generation prompt
    budget: int  # maximum new tokens


class AnswerRegenerator:
    """Answers the assistant turns of conversations with the target, `batch_size` prompts per `generate` call.

    max_new_tokens: the maximum answer length in tokens. max_length: the maximum prompt plus answer length in tokens,
    so an answer stops early when the conversation would grow past it.
    """

    def __init__(
        self,
        target: TargetAdapter,
        encoder: ConversationEncoder,
        max_new_tokens: int,
        max_length: int,
        batch_size: int = 16,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.target = target
        self.encoder = encoder
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.batch_size = batch_size
        tokenizer = encoder.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else target.eos_token_ids[0]

    def regenerate(
        self, conversations: Sequence[Conversation], images: Sequence[Sequence[Image.Image]]
    ) -> list[Conversation | RowError]:
        """Return each conversation with its assistant turns replaced, or the RowError that stopped it."""
        messages = [[dict(message) for message in conversation.messages] for conversation in conversations]
        results: list[Conversation | RowError | None] = [None] * len(conversations)
        next_turn = [_next_assistant_turn(row_messages, 0) for row_messages in messages]

        while True:
            pending = []
            for row, turn in enumerate(next_turn):
                if turn is None or results[row] is not None:
                    continue
                try:
                    pending.append(self.pending_turn(row, turn, messages[row], images[row]))
                except RowError as error:
                    results[row] = error
            if not pending:
                break

            for start in range(0, len(pending), self.batch_size):
                batch = pending[start : start + self.batch_size]
                for item, answer in zip(batch, self.answer(batch)):
                    messages[item.row][item.turn] = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
                    next_turn[item.row] = _next_assistant_turn(messages[item.row], item.turn + 1)

        return [
            result if result is not None else Conversation(conversation.sample_id, messages[row], conversation.images)
            for row, (conversation, result) in enumerate(zip(conversations, results))
        ]

    def pending_turn(self, row: int, turn: int, messages: Sequence[dict], images: Sequence[Image.Image]) -> PendingTurn:
        inputs = self.encoder.prompt_inputs(messages[:turn], images)
        budget = min(self.max_new_tokens, self.max_length - inputs["input_ids"].shape[1])
        if budget < 1:
            raise RowError(SkipReason.TOO_LONG, f"the prompt before turn {turn} fills --max-length")
        return PendingTurn(row, turn, inputs, budget)

    @torch.no_grad()
    def answer(self, batch: Sequence[PendingTurn]) -> list[str]:
        """Generate greedy answers to a batch of prompts and return their text, special tokens removed."""
        inputs = pad_left([item.inputs for item in batch], self.pad_token_id)
        inputs = {name: tensor.to(self.target.device) for name, tensor in inputs.items()}
        # Every row's cache spans the padded prompt plus the new tokens, which must fit the target's context.
        room = self.target.max_positions - inputs["input_ids"].shape[1]
        generation_config = GenerationConfig(
            max_new_tokens=min(max(item.budget for item in batch), room),
            do_sample=False,
            eos_token_id=self.target.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        output = self.target.model.generate(**inputs, generation_config=generation_config)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].cpu()  # (B, new tokens)

        eos = torch.tensor(self.target.eos_token_ids)
        answers = []
        for item, tokens in zip(batch, new_tokens):
            tokens = tokens[: item.budget]
            stops = torch.isin(tokens, eos).nonzero()
            if len(stops):
                tokens = tokens[: int(stops[0])]
            answers.append(self.encoder.tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip())
        return answers


def pad_left(rows: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Join the processor inputs of several single-row prompts into one left-padded batch (see the module docstring)."""
    length = max(row["input_ids"].shape[1] for row in rows)
    names = {name for row in rows for name in row}
    batch = {}
    for name in sorted(names):
        tensors = [row[name] for row in rows if name in row]
        if all(_is_per_token(row.get(name), row["input_ids"]) for row in rows):
            fill = pad_token_id if name == "input_ids" else 0
            batch[name] = torch.cat([_pad_row(tensor, length, fill) for tensor in tensors])
        else:
            batch[name] = torch.cat(tensors)
    return batch


def _is_per_token(tensor: torch.Tensor | None, input_ids: torch.Tensor) -> bool:
    """Check that `tensor` has one entry per prompt token, that is shape (1, T) like `input_ids`."""
    return tensor is not None and tensor.dim() == 2 and tensor.shape == input_ids.shape


def _pad_row(tensor: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    """Pad a (1, T) tensor on the left to (1, length)."""
    padding = tensor.new_full((1, length - tensor.shape[1]), fill)
    return torch.cat([padding, tensor], dim=1)


def _next_assistant_turn(messages: Sequence[dict], start: int) -> int | None:
    for index in range(start, len(messages)):
        if messages[index]["role"] == "assistant":
            return index
    return None
