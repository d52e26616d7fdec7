"""Target features for draft training: run the target over each conversation, with its images, and store a record.

Per sample the record contains (T tokens, H hidden size, N visual tokens, P position rows):

    input_ids      int32 (T,)       chat-templated token ids, each image expanded to its visual tokens
    hidden_states  16-bit (T, H)    the target's last-layer hidden states after the final norm
    visual_embeds  16-bit (N, H)    the projected visual embeddings the language model received, visual rows only
    visual_mask    uint8 (T,)       1 at visual positions
    loss_mask      uint8 (T,)       1 on assistant-turn tokens
    position_ids   int32 (P, T)     stored only when P > 1 (Qwen2-VL's M-RoPE); 1-D positions are arange(T)

The target runs through `TargetAdapter.prefill`, the same call decoding uses, so Qwen2-VL features are computed with
the image and its 3-D positions. The layout on disk and resuming are described in `msd.data.storage`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from msd.data.conversations import Conversation, ConversationEncoder, RowError, SkipReason, load_images, parse_row
from msd.data.regenerate import AnswerRegenerator
from msd.data.rows import Part
from msd.data.storage import PartWriter, check_card, folder_bytes, update_card
from msd.errors import MSDError
from msd.targets.base import TargetAdapter

logger = logging.getLogger(__name__)

#: dataset kinds; a text set is the first training stage, a vision set the multimodal stage
KINDS = ("text", "vision")
#: names of the research pipeline's feature sets -> dataset kind
KIND_ALIASES = {"llava_v15_t": "text", "llava_v15_v": "vision", "qwen2_vl_t": "text", "qwen2_vl_v": "vision"}
#: research kind name -> the target model types it was made for
ALIAS_FAMILIES = {
    "llava_v15_t": ("llava",), "llava_v15_v": ("llava",),
    "qwen2_vl_t": ("qwen2_vl", "qwen2_5_vl"), "qwen2_vl_v": ("qwen2_vl", "qwen2_5_vl"),
}
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: rows tokenised before the run to project its disk size
SIZE_PROBE_ROWS = 16


def resolve_kind(name: str) -> str:
    if name in KINDS:
        return name
    if name in KIND_ALIASES:
        return KIND_ALIASES[name]
    raise MSDError(f"unknown dataset kind {name!r}; use one of {', '.join(KINDS + tuple(KIND_ALIASES))}.")


@dataclass
class PrepareSettings:
    """Settings of one `prepare_features` run: the output, the rows to read and how to record them."""

    output: Path
    kind: str  # "text", "vision" or a research alias
    max_length: int = 2048  # tokens per sample, visual tokens included
    store_dtype: str = "bfloat16"
    image_root: Path | None = None
    system_prompt: str | None = None
    start: int = 0
    limit: int | None = None
    part: Part = Part()
    shard_size: int = 128  # samples per safetensors file
    regenerate: bool = False
    regenerate_max_tokens: int = 512
    # Prompts per generate call, kept in the card: padding can change float rounding, so an answer may differ from the
    # batch-1 answer where the top two logits are within rounding of each other, and a resume must batch alike.
    regenerate_batch_size: int = 16
    logged_skips: int = 5  # skipped rows whose reason is logged one by one

    def __post_init__(self):
        # Checks that need no target, so a bad value fails before the target loads.
        resolve_kind(self.kind)
        if self.store_dtype not in STORE_DTYPES:
            raise MSDError(f"invalid store dtype {self.store_dtype!r}; use {' or '.join(STORE_DTYPES)}.")
        if self.max_length < 2:
            raise MSDError(f"--max-length must be at least 2 tokens, got {self.max_length}.")
        if self.start < 0:
            raise MSDError(f"--start must be 0 or more, got {self.start}.")
        if self.limit is not None and self.limit < 1:
            raise MSDError(f"--limit must be at least 1 row, got {self.limit}.")
        if self.logged_skips < 0:
            raise MSDError(f"--log-skipped must be 0 or more, got {self.logged_skips}.")
        if self.shard_size < 1:
            raise MSDError(f"--shard-size must be at least 1 sample, got {self.shard_size}.")
        if self.regenerate_max_tokens < 1:
            raise MSDError(f"--regenerate-max-tokens must be at least 1, got {self.regenerate_max_tokens}.")
        if self.regenerate_batch_size < 1:
            raise MSDError(f"--regenerate-batch-size must be at least 1, got {self.regenerate_batch_size}.")

    def card_settings(self, target: TargetAdapter, source: str) -> dict:
        """The settings every part and every resume must share, as stored in the dataset card."""
        return {
            **self.option_settings(source),
            "target_model_type": target.config.model_type,
            "hidden_size": target.hidden_size,
            "vocab_size": target.vocab_size,
            "position_rows": target.position_rows,
            "image_token_id": target.image_token_id,
            "chat_template": getattr(target.processor, "chat_template", None),
        }

    def option_settings(self, source: str) -> dict:
        """Return the card settings that come from the options alone, which a rerun checks before the target loads."""
        return {
            "kind": resolve_kind(self.kind),
            "kind_name": self.kind,
            "source": source,
            "system_prompt": self.system_prompt,
            "dtype": self.store_dtype,
            "max_length": self.max_length,
            "start": self.start,
            "limit": self.limit,
            "part_count": self.part.count,
            "regenerate": self.regenerate,
            "regenerate_max_tokens": self.regenerate_max_tokens if self.regenerate else None,
            "regenerate_batch_size": self.regenerate_batch_size if self.regenerate else None,
        }


@dataclass
class PrepareSummary:
    stored: int
    skipped: dict[str, int]
    size_bytes: int
    projected_bytes: int | None


def build_record(prefill, loss_mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Build the stored tensors of one sample (see the module docstring) from the target's prefill."""
    visual_mask = prefill.visual_mask.cpu()  # (T,)
    record = {
        "input_ids": prefill.input_ids.to(torch.int32),
        "hidden_states": prefill.hidden_states.to(dtype),  # (T, H)
        "visual_embeds": prefill.inputs_embeds[prefill.visual_mask].to(dtype),  # (N, H)
        "visual_mask": visual_mask.to(torch.uint8),
        "loss_mask": loss_mask.to(torch.uint8),
    }
    if prefill.positions.shape[0] > 1:
        record["position_ids"] = prefill.positions.to(torch.int32)  # (P, T)
    return record


def sample_bytes(tokens: float, visual_tokens: float, hidden_size: int, position_rows: int, dtype_bytes: int) -> float:
    """Bytes one sample takes in a shard, tensor data only."""
    position_bytes = 4 * position_rows * tokens if position_rows > 1 else 0
    return (tokens + visual_tokens) * hidden_size * dtype_bytes + tokens * (4 + 1 + 1) + position_bytes


class FeaturePreparer:
    """Turns rows into stored target features for one part of a row source."""

    def __init__(self, target: TargetAdapter, settings: PrepareSettings):
        if settings.max_length >= target.max_positions:
            raise MSDError(
                f"--max-length {settings.max_length} must be below the target's context of {target.max_positions} "
                "tokens."
            )
        self.target = target
        self.settings = settings
        self.kind = resolve_kind(settings.kind)
        families = ALIAS_FAMILIES.get(settings.kind, (target.config.model_type,))
        if target.config.model_type not in families:
            logger.warning(
                "--kind %s names the research pipeline's features of a %s target, but this target is a %s model. "
                "The features are this target's; check that --target is the model you mean.",
                settings.kind, " or ".join(families), target.config.model_type,
            )
        self.dtype = STORE_DTYPES[settings.store_dtype]
        self.encoder = ConversationEncoder(target.processor, target.image_token_id, settings.max_length)
        self.regenerator = None
        if settings.regenerate:
            self.regenerator = AnswerRegenerator(
                target, self.encoder, settings.regenerate_max_tokens, settings.max_length, settings.regenerate_batch_size
            )

    def run(self, rows: Sequence, source: str = "") -> PrepareSummary:
        """Process this part's rows, resuming where an earlier run of the same part stopped."""
        settings = self.settings
        settings.output.mkdir(parents=True, exist_ok=True)
        check_card(settings.output, settings.card_settings(self.target, source))
        selected = settings.part.rows(len(rows), settings.start, settings.limit)
        writer = PartWriter(settings.output, settings.part.name, selected.start, settings.shard_size)
        remaining = selected[_rows_done(selected, writer.state.next_row) :]

        projected = self.project_bytes(rows, remaining)
        if projected is not None:
            logger.info("projected size of %d rows: %s (estimate from %d rows)", len(remaining),
                        format_bytes(projected), min(SIZE_PROBE_ROWS, len(remaining)))
        logged = Counter()
        chunk_size = settings.regenerate_batch_size if self.regenerator is not None else 1
        with logging_redirect_tqdm(), tqdm(total=len(remaining), desc=settings.part.name, unit="sample") as progress:
            for start in range(0, len(remaining), chunk_size):
                chunk = remaining[start : start + chunk_size]
                for index, outcome in zip(chunk, self.process_rows(rows, chunk)):
                    if isinstance(outcome, RowError):
                        writer.skip(outcome.reason)
                        logged[outcome.reason] += 1
                        if logged[outcome.reason] <= settings.logged_skips:
                            logger.warning("skipping row %d (%s): %s", index, outcome.reason, outcome.detail)
                    else:
                        writer.add(*outcome)
                # Commits fall on chunk ends, so a resumed run regenerates the same rows in the same batches.
                if writer.full:
                    writer.commit(next_row=chunk[-1] + 1)
                progress.update(len(chunk))
                progress.set_postfix(stored=writer.state.stored + len(writer.entries), skipped=logged.total())
        writer.commit(next_row=selected.stop, finished=True)
        card = update_card(settings.output)
        return PrepareSummary(
            stored=writer.state.stored,
            skipped=dict(writer.state.skipped),
            size_bytes=card["size_bytes"],
            projected_bytes=projected,
        )

    def process_rows(self, rows: Sequence, indices: Sequence[int]) -> list[tuple | RowError]:
        """Read, answer (with --regenerate), run and record rows.

        Returns one outcome per row: `(key, record, entry)`, or the RowError that skips the row.
        """
        outcomes: dict[int, tuple | RowError] = {}
        loaded = []  # (row index, conversation, images)
        for index in indices:
            try:
                loaded.append((index, *self.read_row(rows, index)))
            except RowError as error:
                outcomes[index] = error

        if self.regenerator is not None and loaded:
            answered = self.regenerator.regenerate([item[1] for item in loaded], [item[2] for item in loaded])
            loaded = [(index, conversation, images) for (index, _, images), conversation in zip(loaded, answered)]

        for index, conversation, images in loaded:
            if isinstance(conversation, RowError):
                outcomes[index] = conversation
                continue
            try:
                outcomes[index] = self.record_row(conversation, images, index)
            except RowError as error:
                outcomes[index] = error
        return [outcomes[index] for index in indices]

    def read_row(self, rows: Sequence, index: int) -> tuple[Conversation, list]:
        conversation = parse_row(rows[index], index, self.settings.system_prompt)
        if conversation.images and self.kind == "text":
            raise RowError(SkipReason.IMAGE_IN_TEXT_SET, "the row has images but the dataset kind is text")
        return conversation, load_images(conversation, self.settings.image_root)

    def record_row(self, conversation: Conversation, images: Sequence, index: int) -> tuple[str, dict, dict]:
        """Run the target over one conversation and build its stored record and manifest entry."""
        sample = self.encoder.encode(conversation, images)
        # NOTE: one sample per feature forward, because TargetAdapter.prefill takes batch 1. Only the --regenerate
        # answers are generated in batches.
        try:
            prefill, _ = self.target.prefill(sample.inputs)
        except MSDError as error:
            raise RowError(SkipReason.PROCESSOR_REJECTED, str(error)) from None

        key = f"r{index:09d}"
        record = build_record(prefill, sample.loss_mask, self.dtype)
        entry = {
            "key": key,
            "id": conversation.sample_id,
            "row": index,
            "kind": self.kind,
            "length": int(record["input_ids"].shape[0]),
            "visual_tokens": int(record["visual_embeds"].shape[0]),
            "loss_tokens": int(sample.loss_mask.sum()),
            "images": sample.images,
        }
        return key, record, entry

    def project_bytes(self, rows: Sequence, indices: Sequence[int]) -> int | None:
        """Disk size projected from the token counts of the first rows, tokenised without running the target.

        With --regenerate the rows' own answers are replaced, so each assistant turn is counted at
        --regenerate-max-tokens instead: the projection assumes answers of the maximum length.
        """
        tokens, visual = [], []
        for index in indices[:SIZE_PROBE_ROWS]:
            try:
                conversation = parse_row(rows[index], index, self.settings.system_prompt)
                sample = self.encoder.encode(conversation, load_images(conversation, self.settings.image_root))
            except RowError:
                continue
            input_ids = sample.inputs["input_ids"][0]
            count = input_ids.shape[0]
            if self.regenerator is not None:
                answers = [_message_text(item) for item in conversation.messages if item["role"] == "assistant"]
                tokenizer = self.encoder.tokenizer
                answer_tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in answers)
                count += len(answers) * self.settings.regenerate_max_tokens - answer_tokens
            tokens.append(count)
            visual.append(int((input_ids == self.target.image_token_id).sum()))
        if not tokens:
            return None
        per_sample = sample_bytes(
            sum(tokens) / len(tokens),
            sum(visual) / len(visual),
            self.target.hidden_size,
            self.target.position_rows,
            self.dtype.itemsize,
        )
        return int(per_sample * len(indices))


def _message_text(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def _rows_done(selected: range, next_row: int) -> int:
    """Count the selected rows that come before `next_row`."""
    if next_row <= selected.start:
        return 0
    return min(len(selected), -(-(next_row - selected.start) // selected.step))


def format_bytes(count: float) -> str:
    """Write a byte count with a decimal unit, for example "392.4 KB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def prepare_features(target: TargetAdapter, rows: Sequence, settings: PrepareSettings, source: str = "") -> PrepareSummary:
    """Store target features for `settings.part` of `rows` in `settings.output` and return the run's summary."""
    summary = FeaturePreparer(target, settings).run(rows, source)
    logger.info(
        "stored %d samples; skipped %s; folder size %s",
        summary.stored,
        ", ".join(f"{reason}: {count}" for reason, count in sorted(summary.skipped.items())) or "none",
        format_bytes(folder_bytes(settings.output)),
    )
    return summary
