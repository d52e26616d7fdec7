"""LLaVA-format rows -> chat-templated token ids, assistant-only loss masks and image lists.

Row format (LLaVA-1.5 instruction data and ShareGPT):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",       # optional; a path or a list of paths
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}]}

Each `<image>` placeholder marks where an image goes; a row with images and no placeholder gets all images at the
start of its first user turn. The conversation is rendered with the processor's own chat template (LLaVA-1.5's
Vicuna-style template, Qwen2-VL's ChatML) and tokenised by the processor, which expands each image into its visual
tokens.

Loss mask. An assistant turn's characters are the text that rendering the turn appends to the rendered prompt before
it (the prompt ends with the template's generation prompt). That is the answer plus the end-of-turn marker the model
must generate (`</s>`, `<|im_end|>`), without trailing whitespace. A token is in the loss mask when its character
span overlaps an assistant turn. Character spans come from the tokenizer's offset mapping on the rendered text, where
each image is still one placeholder token, and are carried over to the processor's ids, where it is expanded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from msd.errors import MSDError
from msd.images import load_image

#: placeholder for an image in LLaVA-format text
IMAGE_PLACEHOLDER = "<image>"

#: speaker names in LLaVA and ShareGPT rows -> chat-template roles
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}


#: processor outputs with one entry per token, shape (1, T)
TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class SkipReason:
    """Reasons for skipping a row. The values are the keys of the skipped-row counts."""

    MALFORMED_JSON = "malformed_json"
    MALFORMED_ROW = "malformed_row"
    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"
    IMAGE_IN_TEXT_SET = "image_in_text_set"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    TOO_LONG = "too_long"
    PROCESSOR_REJECTED = "processor_rejected"
    TEMPLATE_MISMATCH = "template_mismatch"


class RowError(Exception):
    """A row that cannot become a training sample; `reason` is a SkipReason value."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Conversation:
    """One row as chat-template messages (content as typed lists) plus its images in placeholder order."""

    sample_id: str
    messages: list[dict]
    images: list  # paths relative to the image root, or PIL images (rows of a `datasets` dataset)


@dataclass
class EncodedSample:
    """Processor inputs of one conversation (batch 1) and its loss mask over the T tokens."""

    inputs: dict[str, torch.Tensor]
    loss_mask: torch.Tensor  # (T,) bool, True on assistant-turn tokens
    images: int  # images kept after truncation


def parse_row(row: Mapping, row_index: int, system_prompt: str | None = None) -> Conversation:
    """Turn a LLaVA-format row into a Conversation; raises RowError for a row that cannot be used."""
    if not isinstance(row, Mapping) or not isinstance(row.get("conversations"), list):
        raise RowError(SkipReason.MALFORMED_ROW, "the row has no 'conversations' list")
    images = _row_images(row.get("image"))
    turns = _row_turns(row["conversations"])

    while turns and turns[0][0] == "assistant":  # ShareGPT chats sometimes open with the assistant
        turns.pop(0)
    while turns and turns[-1][0] != "assistant":  # a trailing question has no answer to learn from
        turns.pop()
    if not any(role == "assistant" for role, _ in turns):
        raise RowError(SkipReason.NO_ASSISTANT_TURN, "the conversation has no answer from gpt/assistant")

    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
    if any(IMAGE_PLACEHOLDER in text for role, text in turns if role != "user"):
        raise RowError(SkipReason.MALFORMED_ROW, f"{IMAGE_PLACEHOLDER} appears outside a human turn")
    if placeholders and placeholders != len(images):
        raise RowError(
            SkipReason.MALFORMED_ROW, f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images"
        )

    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    leading_images = len(images) if not placeholders else 0
    for role, text in turns:
        messages.append({"role": role, "content": _content(text, leading_images)})
        if role == "user":
            leading_images = 0
    sample_id = str(row.get("id", row_index))
    return Conversation(sample_id=sample_id, messages=messages, images=images)


def _row_images(value) -> list:
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, (str, Image.Image)):
            raise RowError(SkipReason.MALFORMED_ROW, f"'image' must be a path or a list of paths, got {item!r:.80}")
    return list(items)


def _row_turns(conversations: list) -> list[tuple[str, str]]:
    turns = []
    for turn in conversations:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise RowError(SkipReason.MALFORMED_ROW, f"a turn must have a string 'value', got {turn!r:.80}")
        speaker = str(turn.get("from", "")).lower()
        if speaker not in ROLES:
            raise RowError(SkipReason.MALFORMED_ROW, f"unknown speaker {speaker!r}; expected human or gpt")
        turns.append((ROLES[speaker], turn["value"]))
    return turns


def _content(text: str, leading_images: int) -> list[dict]:
    """Chat-template content items: images at the placeholders (or first), text pieces in between."""
    content: list[dict] = [{"type": "image"} for _ in range(leading_images)]
    pieces = text.split(IMAGE_PLACEHOLDER)
    for index, piece in enumerate(pieces):
        if len(pieces) > 1:
            piece = piece.strip("\n")  # LLaVA data writes "<image>\n"; templates add their own separators
        if piece:
            content.append({"type": "text", "text": piece})
        if index < len(pieces) - 1:
            content.append({"type": "image"})
    return content


def load_images(conversation: Conversation, image_root: Path | None) -> list[Image.Image]:
    """Open a conversation's images as RGB; raises RowError for a missing or unreadable file."""
    images = []
    for item in conversation.images:
        if isinstance(item, Image.Image):
            images.append(item.convert("RGB"))
            continue
        path = Path(image_root, item) if image_root is not None else Path(item)
        if not path.is_file():
            hint = "" if image_root is not None or path.is_absolute() else (
                " (read from the current folder: pass --image-root with the folder the data's image paths start from)"
            )
            raise RowError(SkipReason.MISSING_IMAGE, f"image file not found: {path}{hint}")
        try:
            images.append(load_image(path))
        except MSDError as error:
            raise RowError(SkipReason.UNREADABLE_IMAGE, str(error)) from None
    return images


def _cut(sample: EncodedSample, length: int) -> EncodedSample:
    """Keep the first `length` tokens of a sample whose later tokens are text only."""
    inputs = {
        name: value[:, :length] if name in TOKEN_INPUTS else value
        for name, value in sample.inputs.items()
    }
    return EncodedSample(inputs=inputs, loss_mask=sample.loss_mask[:length], images=sample.images)


def count_images(messages: Sequence[dict]) -> int:
    return sum(item["type"] == "image" for message in messages for item in message["content"])


class ConversationEncoder:
    """Renders conversations with a processor's chat template and tokenises them with their images.

    processor: the target's processor (callable as `processor(images=..., text=..., return_tensors="pt")`, with
    `apply_chat_template` and a fast `tokenizer`); image_token_id: the token the processor repeats once per visual
    token; max_length: the longest sample kept, in tokens, visual tokens included.
    """

    def __init__(self, processor, image_token_id: int, max_length: int):
        if processor is None or getattr(processor, "chat_template", None) is None:
            raise MSDError("the target's processor has no chat template; msd prepare-data needs one to render rows.")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if not getattr(self.tokenizer, "is_fast", False):
            raise MSDError(
                f"the target's tokenizer {type(self.tokenizer).__name__} is not a fast tokenizer; loss masks need "
                "its offset mapping. Save the target with a tokenizer.json (a fast tokenizer)."
            )
        self.image_token_id = image_token_id
        self.max_length = max_length

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt_inputs(self, messages: Sequence[dict], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Processor inputs for `messages` followed by the template's generation prompt."""
        return self._process(self.render(messages, add_generation_prompt=True), images[: count_images(messages)])

    def encode(self, conversation: Conversation, images: Sequence[Image.Image]) -> EncodedSample:
        """Tokenise a whole conversation; past max_length, keep the longest run of whole turns ending in an answer."""
        messages = conversation.messages
        sample, turn_ends = self._encode_messages(messages, images)
        if sample.loss_mask.shape[0] <= self.max_length:
            return sample

        assistant_turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        fitting = [turn for turn, end in zip(assistant_turns, turn_ends) if end <= self.max_length]
        if not fitting:
            raise RowError(
                SkipReason.TOO_LONG,
                f"the first answer ends at token {turn_ends[0]}, beyond --max-length {self.max_length}",
            )
        kept = messages[: fitting[-1] + 1]
        sample, kept_ends = self._encode_messages(kept, images[: count_images(kept)])
        return _cut(sample, kept_ends[-1])  # the template may add text after the last answer (ChatML's "\n")

    def _encode_messages(
        self, messages: Sequence[dict], images: Sequence[Image.Image]
    ) -> tuple[EncodedSample, list[int]]:
        text, spans = self._assistant_spans(messages)
        inputs = self._process(text, images)
        input_ids = inputs["input_ids"][0]  # (T,) with images expanded

        # Tokenise the same text with each image still one placeholder token, for its character offsets.
        plain = self.tokenizer(text, return_offsets_mapping=True)
        plain_ids = torch.tensor(plain["input_ids"])
        starts = torch.tensor([start for start, _ in plain["offset_mapping"]])
        ends = torch.tensor([end for _, end in plain["offset_mapping"]])
        plain_mask = torch.zeros(plain_ids.shape[0], dtype=torch.bool)
        turn_ends_plain = []
        for span_start, span_end in spans:
            overlap = (starts < span_end) & (ends > span_start)
            plain_mask |= overlap
            turn_ends_plain.append(int(overlap.nonzero().max()) + 1 if overlap.any() else 0)

        # Text tokens line up one to one; only the image placeholders differ in count.
        is_text = input_ids != self.image_token_id
        plain_is_text = plain_ids != self.image_token_id
        if not torch.equal(input_ids[is_text], plain_ids[plain_is_text]):
            raise RowError(
                SkipReason.TEMPLATE_MISMATCH, "the processor's token ids differ from the tokenizer's on the same text"
            )
        text_positions = is_text.nonzero()[:, 0]  # (number of text tokens,) positions in the processor's ids
        plain_rank = torch.cumsum(plain_is_text.long(), 0)  # text tokens up to and including each plain position
        loss_mask = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        loss_mask[text_positions] = plain_mask[plain_is_text]
        turn_ends = [int(text_positions[plain_rank[end - 1] - 1]) + 1 if end else 0 for end in turn_ends_plain]
        return EncodedSample(inputs=inputs, loss_mask=loss_mask, images=len(images)), turn_ends

    def _assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Render the conversation and locate the character span [start, end) of each assistant turn in it."""
        text = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            with_answer = self.render(messages[: index + 1])
            if not (with_answer.startswith(prompt) and text.startswith(with_answer)):
                raise RowError(
                    SkipReason.TEMPLATE_MISMATCH,
                    f"rendering turn {index} changes the text before it, so its tokens cannot be located",
                )
            spans.append((len(prompt), len(with_answer.rstrip())))
        return text, spans

    def _process(self, text: str, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        try:
            inputs = self.processor(images=list(images) or None, text=text, return_tensors="pt")
        except (ValueError, TypeError) as error:
            raise RowError(SkipReason.PROCESSOR_REJECTED, str(error)) from None
        return dict(inputs)
