"""Training the LLaVA projector of a built target on image-question-answer data, resumable from checkpoints.

Only `multi_modal_projector` learns; the vision encoder and the LM stay frozen, as in LLaVA's first (alignment)
stage. Vision features are precomputed (see `vqa_data`). The loss is the next-token cross-entropy on the answer
tokens and the end-of-turn token after them, and the LM head runs only at those positions, which keeps the step cost
close to one forward and backward pass of the decoder.

Checkpoints hold the projector, optimizer, learning-rate schedule and step. The data order is a function of the seed
and the step (one fixed permutation per epoch), so a resumed run sees exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor, get_cosine_schedule_with_warmup

from msd.embedded.projector import write_projector
from msd.embedded.vqa_data import VQAExample, cached_vision_features, load_easy_vqa
from msd.errors import MSDError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHECKPOINT_WEIGHTS = "projector.safetensors"
CHECKPOINT_STATE = "trainer_state.pt"


@dataclass(frozen=True)
class ProjectorTraining:
    """Settings of a projector training run; a checkpoint only resumes a run with the same settings."""

    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    max_images: int | None = None  # None: all easy-VQA training images

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise MSDError(f"steps and batch size must be at least 1, got {self.steps} and {self.batch_size}.")
        if self.learning_rate <= 0:
            raise MSDError(f"the learning rate must be positive, got {self.learning_rate}.")
        if self.max_images is not None and self.max_images < 1:
            raise MSDError(f"max images must be at least 1, got {self.max_images}.")


def train_projector(
    target: Path,
    output: Path,
    work_dir: Path,
    settings: ProjectorTraining,
    checkpoint_every: int = 25,
    stop_after: int | None = None,
) -> Path:
    """Train the projector of the target folder `target` and write it to `output` when the run completes.

    `work_dir` contains the vision feature cache and the checkpoint; an existing checkpoint there is resumed.
    `stop_after` ends this sitting after that many steps (a checkpoint is written), leaving the run resumable.
    Returns `output`, or the checkpoint folder when the sitting stopped early.
    """
    settings.check()
    torch.manual_seed(settings.seed)
    model = LlavaForConditionalGeneration.from_pretrained(target, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(target)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector.requires_grad_(True)

    examples, image_paths = load_easy_vqa("train", settings.max_images)
    features = cached_vision_features(model, processor, image_paths, work_dir / f"easy-vqa-train-{len(image_paths)}.safetensors")
    tokens_per_image = model.config.image_seq_length
    if features.shape[1] != tokens_per_image:
        raise MSDError(
            f"the vision features have {features.shape[1]} tokens per image but the target expects {tokens_per_image}."
        )

    optimizer = torch.optim.AdamW(projector.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    checkpoint = work_dir / "checkpoint"
    step = resume(checkpoint, settings, projector, optimizer, schedule)
    last_step = settings.steps if stop_after is None else min(settings.steps, step + stop_after)

    progress = tqdm(total=settings.steps, initial=step, desc="projector", unit="step")
    while step < last_step:
        started = time.perf_counter()
        batch = [examples[index] for index in batch_indices(step, settings, len(examples))]
        loss = answer_loss(model, processor, batch, features)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}", samples_per_s=f"{len(batch) / (time.perf_counter() - started):.2f}")
        if step % checkpoint_every == 0 or step == last_step:
            save_checkpoint(checkpoint, settings, projector, optimizer, schedule, step)
    progress.close()

    if step < settings.steps:
        logger.info("stopped at step %d of %d; run the same command again to resume", step, settings.steps)
        return checkpoint
    metadata = {
        "image_size": str(processor.image_processor.size["height"]),
        "tokens_per_image": str(tokens_per_image),
        "vision_feature_layer": str(model.config.vision_feature_layer),
        "data": "easy-vqa 1.0 train",
        "settings": str(asdict(settings)),
    }
    write_projector(output, projector.state_dict(), metadata)
    logger.info("wrote the trained projector to %s", output)
    return output


def batch_indices(step: int, settings: ProjectorTraining, dataset_size: int) -> list[int]:
    """Indices of the examples in batch `step`: consecutive slices of one seeded permutation per epoch."""
    indices = []
    for position in range(step * settings.batch_size, (step + 1) * settings.batch_size):
        epoch, offset = divmod(position, dataset_size)
        order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(settings.seed + epoch))
        indices.append(int(order[offset]))
    return indices


def tokenize_batch(processor: LlavaProcessor, batch: list[VQAExample], tokens_per_image: int):
    """Chat-templated token ids (B, L), attention mask (B, L) and labels (B, L), right-padded.

    Labels are the answer and the end-of-turn token that closes it; the prompt, the template's newline after the
    end-of-turn token and the padding are IGNORE_INDEX.
    """
    tokenizer = processor.tokenizer
    image_marker = processor.image_token * tokens_per_image
    rows = []
    for example in batch:
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}]
        prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(
            user + [{"role": "assistant", "content": [{"type": "text", "text": example.answer}]}], tokenize=False
        )
        prompt_ids = tokenizer(prompt.replace(processor.image_token, image_marker), add_special_tokens=False).input_ids
        full_ids = tokenizer(full.replace(processor.image_token, image_marker), add_special_tokens=False).input_ids
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise MSDError("the chat template does not render the prompt as a prefix of the full conversation.")
        answer = full_ids[len(prompt_ids) :]
        end = answer.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in answer else len(answer)
        rows.append((full_ids, len(prompt_ids), len(prompt_ids) + end))

    length = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, answer_start, answer_end) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, answer_start:answer_end] = input_ids[row, answer_start:answer_end]
    return input_ids, attention_mask, labels


def answer_loss(model, processor, batch: list[VQAExample], features: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, with projected cached features at the image tokens."""
    input_ids, attention_mask, labels = tokenize_batch(processor, batch, features.shape[1])
    image_features = features[[example.image for example in batch]]  # (B, T, D_vision)
    projected = model.model.multi_modal_projector(image_features)  # (B, T, H)

    inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, L, H)
    visual_mask = (input_ids == model.config.image_token_id).unsqueeze(-1)  # (B, L, 1)
    inputs_embeds = inputs_embeds.masked_scatter(visual_mask, projected.to(inputs_embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    targets = labels[:, 1:]  # position t predicts token t + 1
    scored = targets != IGNORE_INDEX  # (B, L - 1)
    logits = model.lm_head(hidden[:, :-1][scored])  # (answer tokens, V)
    return F.cross_entropy(logits.float(), targets[scored])


def save_checkpoint(folder: Path, settings, projector, optimizer, schedule, step: int) -> None:
    """Write the checkpoint into a sibling folder, then swap it in, so a crash keeps the previous one."""
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in projector.state_dict().items()}, str(staging / CHECKPOINT_WEIGHTS))
    state = {
        "step": step,
        "settings": asdict(settings),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
    }
    torch.save(state, staging / CHECKPOINT_STATE)
    retired = folder.with_name(folder.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    if folder.exists():
        folder.replace(retired)
    staging.replace(folder)
    shutil.rmtree(retired, ignore_errors=True)


def resume(folder: Path, settings: ProjectorTraining, projector, optimizer, schedule) -> int:
    """Load the checkpoint in `folder` if there is one and return its step (0 without one).

    Raises MSDError when the checkpoint was written with other settings.
    """
    if not (folder / CHECKPOINT_STATE).is_file():
        return 0
    state = torch.load(folder / CHECKPOINT_STATE, weights_only=True)
    if state["settings"] != asdict(settings):
        raise MSDError(
            f"the checkpoint in {folder} was written with settings {state['settings']}, not {asdict(settings)}. "
            "Use the same settings to resume, or another work directory to start over."
        )
    projector.load_state_dict(load_file(str(folder / CHECKPOINT_WEIGHTS)))
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    logger.info("resuming projector training from step %d in %s", state["step"], folder)
    return state["step"]
