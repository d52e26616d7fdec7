"""The draft training loop on stored target features, through accelerate (CPU, one GPU, DDP or DeepSpeed ZeRO).

Data order. Each epoch's plan (`msd.train.curriculum`) lists its samples; one optimizer step consumes the next
micro_batch_size x gradient_accumulation x processes of them. Micro-batch k of a step on process r takes the
micro_batch_size samples at offset (k x processes + r) x micro_batch_size in the step's share of the plan. The plan
depends only on the seed and the curriculum position, so `resume` continues with the same samples in the same order,
provided the batch geometry (micro-batch, accumulation, processes) is unchanged.

The target is loaded for its embedding and LM head only; both stay frozen and are neither trained nor saved.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from msd.draft import DraftConfig, DraftModel
from msd.errors import MSDError
from msd.train.checkpoint import (
    checkpoint_step,
    find_resume_checkpoint,
    list_checkpoints,
    read_trainer_state,
    save_checkpoint,
)
from msd.train.config import TrainConfig
from msd.train.curriculum import MULTIMODAL, TEXT, Curriculum, CurriculumConfig, CurriculumPosition
from msd.train.data import FeatureSource, check_features_fit, default_collate, split_source
from msd.train.loss import build_slots, compute_loss, count_step_slots, counted_slots
from msd.train.metrics import MetricWindow, tensorboard_available, write_metrics
from msd.train.vocab import draft_vocab_from_datasets

logger = logging.getLogger(__name__)

FINAL_DRAFT = "draft"
SEQUENCE_KEYS = ("input_ids", "hidden_states", "visual_embeds", "visual_mask", "loss_mask", "attention_mask")


def make_accelerator(config: TrainConfig, output_dir: str | Path) -> Accelerator:
    """Create an Accelerator for `config`. The launch configuration (DDP, DeepSpeed) comes from `accelerate launch`."""
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with="tensorboard" if tensorboard_available() else None,
        project_dir=str(output_dir),
    )


@dataclass
class _Progress:
    """The loop's position: global optimizer steps done and the curriculum position."""

    step: int
    position: CurriculumPosition


class DraftTrainer:
    """Trains an MSD draft for `target` (a TargetAdapter) on text and multimodal feature datasets.

    Either dataset may be None (a single-stage run). `collate` defaults to `msd.data.dataset.collate_features`;
    `draft` starts training from an existing DraftModel instead of a fresh one.
    """

    def __init__(
        self,
        config: TrainConfig,
        target,
        text_data,
        multimodal_data,
        output_dir: str | Path,
        accelerator: Accelerator | None = None,
        collate=None,
        draft: DraftModel | None = None,
    ):
        if text_data is None and multimodal_data is None:
            raise MSDError("no training data. Pass --text-data, --vision-data or both.")
        self.config = config
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator or make_accelerator(config, output_dir)
        self.collate = collate or default_collate()
        self.sources: dict[int, FeatureSource] = {}
        inputs = ((TEXT, "text", "text", text_data), (MULTIMODAL, "multimodal", "vision", multimodal_data))
        for source, name, kind, dataset in inputs:
            if dataset is not None:
                check_features_fit(dataset, target, name, kind)
                self.sources[source] = split_source(name, dataset, config.eval_samples, config.seed)

        self.draws_per_step = config.micro_batch_size * config.gradient_accumulation * self.accelerator.num_processes
        sizes = [self.sources[source].size if source in self.sources else 0 for source in (TEXT, MULTIMODAL)]
        self.curriculum = Curriculum(
            config.curriculum.resolve(config.epochs), *sizes, draws_per_step=self.draws_per_step, seed=config.seed
        )
        self.total_steps = self._count_steps()
        self._check_multimodal_reached()

        self.draft = self._build_draft(target, draft)
        # (V, H): held-out agreement of a reduced-vocabulary draft is counted over the target's whole vocabulary.
        # Training steps count it within the draft vocabulary, which spares a full-head product per step.
        self.target_head = target.lm_head.weight.detach()
        parameters = [parameter for parameter in self.draft.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay
        )
        if config.warmup_steps >= self.total_steps:
            logger.warning(
                "the learning-rate warm-up (%d steps) is not shorter than the run (%d optimizer steps), so the "
                "learning rate never reaches %g. Lower --warmup-steps.",
                config.warmup_steps, self.total_steps, config.learning_rate,
            )
        self.scheduler = get_scheduler(
            config.lr_schedule,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self._prepare_deepspeed()
        self.model, self.optimizer = self.accelerator.prepare(self.draft, optimizer)
        # `_step_slot_totals` relies on accelerate dividing each micro-batch's loss by this count (DeepSpeed's
        # value, which `_prepare_deepspeed` set, once prepared).
        if self.accelerator.gradient_accumulation_steps != config.gradient_accumulation:
            raise MSDError(
                f"accelerate accumulates gradients over {self.accelerator.gradient_accumulation_steps} micro-batches "
                f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS or the Accelerator passed in), but gradient_accumulation is "
                f"{config.gradient_accumulation}. Unset the variable, or build the Accelerator with make_accelerator."
            )
        # The scheduler counts optimizer steps: it is stepped here rather than prepared, because accelerate's
        # wrapper steps it once per process.
        self.accelerator.register_for_checkpointing(self.scheduler)

    # -- setup ----------------------------------------------------------------------------------------

    def _build_draft(self, target, draft: DraftModel | None) -> DraftModel:
        vocab_size = self.config.draft_vocab_size
        if draft is None:
            torch.manual_seed(self.config.seed)
            config = DraftConfig.for_target(
                target,
                input_layernorm=self.config.input_layernorm,
                draft_vocab_size=vocab_size,
                decouple_visual=self.config.decouple_visual,
                num_layers=self.config.draft_layers or 1,
            )
            draft = DraftModel(config)
            if vocab_size is not None:
                sources = [(source.dataset, source.train_indices) for source in self.sources.values()]
                draft.draft_to_target.copy_(draft_vocab_from_datasets(sources, target, vocab_size))
        elif self.config.draft_layers not in (None, draft.config.num_layers):
            raise MSDError(
                f"draft_layers {self.config.draft_layers} does not match the draft this run starts from (--init-draft, "
                f"or the checkpoint on --resume), which has {draft.config.num_layers}. Leave draft_layers unset "
                "(null in a config file) to keep it."
            )
        elif vocab_size is not None and vocab_size != draft.config.draft_vocab_size:
            raise MSDError(
                f"draft_vocab_size {vocab_size} does not match the draft this run starts from (--init-draft, or the "
                f"checkpoint on --resume), which has {draft.config.draft_vocab_size}. Leave draft_vocab_size unset "
                "(null in a config file) to keep it."
            )
        # A 16-bit target gets float32 master weights (mixed_precision runs the forward in 16-bit). Converting in
        # attach keeps a loaded draft's saved precision, where a detour through the target's dtype would round it.
        draft.attach(target, dtype=torch.float32 if target.dtype in (torch.float16, torch.bfloat16) else None)
        return draft.train()

    def _count_steps(self) -> int:
        steps = self.curriculum.epoch_starts(self.config.epochs)[-1]
        return min(steps, self.config.max_steps) if self.config.max_steps else steps

    def _check_multimodal_reached(self) -> None:
        """Warn when multimodal data is given but the run ends inside the text-only stage."""
        if MULTIMODAL not in self.sources:
            return
        starts = self.curriculum.epoch_starts(self.config.epochs)
        last_epoch = max(epoch for epoch in range(self.config.epochs) if starts[epoch] < self.total_steps)
        if self.curriculum.multimodal_probability(last_epoch, self.total_steps - 1) == 0:
            curriculum = self.curriculum.config
            logger.warning(
                "the run ends (epoch %d, step %d) before the curriculum draws any multimodal sample (text only for "
                "%d %s, then a ramp of %d), so --vision-data is not used. Lower the curriculum's text_only and ramp, "
                "or raise --epochs or --max-steps.",
                last_epoch + 1, self.total_steps, curriculum.text_only, curriculum.unit, curriculum.ramp,
            )

    def _prepare_deepspeed(self) -> None:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.config.micro_batch_size
            plugin.deepspeed_config["gradient_accumulation_steps"] = self.config.gradient_accumulation
            plugin.deepspeed_config["gradient_clipping"] = self.config.max_grad_norm

    # -- the loop -------------------------------------------------------------------------------------

    def train(self, resume: str | Path | bool = False, stop_at_step: int | None = None) -> Path:
        """Train to the end of the schedule and return the final draft folder.

        resume: True for the newest checkpoint in the output folder, or a checkpoint folder. stop_at_step ends the
        call after that global step as an interruption would (the schedule is unchanged): a later resume starts from
        the last checkpoint the save schedule wrote.
        """
        earlier = [] if resume else list_checkpoints(self.output_dir)
        if earlier:  # a fresh run's early checkpoints would rotate out the earlier run's later ones
            raise MSDError(
                f"{self.output_dir} already contains the checkpoints of a run (up to {earlier[-1].name}). Pass "
                "--resume to continue it, or choose another --output."
            )
        progress = self._resume(resume) if resume else _Progress(0, CurriculumPosition())
        self.accelerator.init_trackers("msd_train")
        bar = tqdm(
            total=self.total_steps,
            initial=progress.step,
            desc="training draft",
            unit="step",
            disable=not self.accelerator.is_main_process,
        )
        window = MetricWindow()
        stopped = False
        while progress.position.epoch < self.config.epochs and progress.step < self.total_steps and not stopped:
            stopped = self._run_epoch(progress, window, bar, stop_at_step)
        bar.close()
        if stopped:
            self.accelerator.end_training()
            return self.output_dir
        final = self.output_dir / FINAL_DRAFT
        if self.accelerator.is_main_process:
            save_dtype = getattr(torch, self.config.save_dtype) if self.config.save_dtype else None
            self.draft.save_pretrained(final, dtype=save_dtype)
            logger.info("training finished after %d steps; draft saved to %s", progress.step, final)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()  # last: it also ends the process group of a distributed run
        return final

    def _run_epoch(self, progress: _Progress, window: MetricWindow, bar, stop_at_step: int | None) -> bool:
        """Run the rest of the current epoch; returns True when stopped by `stop_at_step`."""
        position = progress.position
        first_step = progress.step - position.step_in_epoch
        plan = self.curriculum.plan(position.epoch, first_step, position)
        steps = len(plan.sources) // self.draws_per_step
        if position.step_in_epoch >= steps:  # `_resume` rejects the changes that shorten a saved epoch
            raise MSDError(
                f"epoch {position.epoch + 1} has {steps} steps, but this run is at its step {position.step_in_epoch}. "
                "Resume with the data, eval_samples, epochs and curriculum of the interrupted run, or start a new run."
            )
        p = self.curriculum.multimodal_probability(position.epoch, first_step)
        logger.info(
            "epoch %d: %d steps, multimodal probability %.3f, multimodal share %.3f",
            position.epoch + 1, steps, p, plan.multimodal_share,
        )
        self.accelerator.log({"curriculum/multimodal_share": plan.multimodal_share}, step=progress.step)

        batches = self._rank_batches(plan, position.step_in_epoch)
        loader = DataLoader(
            _PlanSamples(self.sources),
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.config.num_workers,
        )
        micro_batches = []
        for keys, batch in zip(batches, loader):
            micro_batches.append((keys, self._truncate(batch)))  # on the host until its turn, to spare device memory
            if len(micro_batches) < self.config.gradient_accumulation:
                continue
            self._train_step(micro_batches, progress.step, window)
            micro_batches = []
            self._optimizer_step()
            progress.step += 1
            position.step_in_epoch += 1
            end_of_epoch = position.step_in_epoch == steps
            if end_of_epoch:
                progress.position = self.curriculum.advance(position, plan)  # checkpoints resume at the next epoch
            bar.update(1)
            self._after_step(progress, window, end_of_epoch)
            if progress.step == stop_at_step:
                return True
            if progress.step >= self.total_steps:
                break
        return False

    def _rank_batches(self, plan, start_step: int) -> list[list[tuple[int, int]]]:
        """This process's micro-batches from `start_step` of the epoch on, as (source, dataset index) keys."""
        size = self.config.micro_batch_size
        processes = self.accelerator.num_processes
        rank = self.accelerator.process_index
        batches = []
        for step in range(start_step, len(plan.sources) // self.draws_per_step):
            base = step * self.draws_per_step
            for micro in range(self.config.gradient_accumulation):
                offset = base + (micro * processes + rank) * size
                keys = []
                for draw in range(offset, offset + size):
                    source = int(plan.sources[draw])
                    keys.append((source, int(self.sources[source].train_indices[plan.indices[draw]])))
                batches.append(keys)
        return batches

    def _train_step(self, micro_batches: list, step: int, window: MetricWindow) -> None:
        """Accumulate the gradients of one optimizer step's (keys, host batch) micro-batches of this process."""
        totals = self._step_slot_totals([batch for _, batch in micro_batches])
        for keys, batch in micro_batches:
            self._train_micro_batch(batch, keys, step, totals, window)

    def _step_slot_totals(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, ...]:
        """Per unrolled step, the counted slots of the whole optimizer step divided by micro-batches x processes.

        `accelerator.backward` divides each micro-batch's loss by the accumulation count, and DDP (or DeepSpeed)
        averages gradients over processes. Dividing each micro-batch's loss sum by this share of the total therefore
        gives the gradient of the mean over every counted slot of the step.
        """
        steps = self.config.loss.unroll_steps
        local = [count_step_slots(counted_slots(batch), steps) for batch in micro_batches]
        counts = [sum(column) for column in zip(*local)]
        counts = torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        shares = self.config.gradient_accumulation * self.accelerator.num_processes
        return tuple(float(count) / shares for count in counts.tolist())

    def _train_micro_batch(self, batch, keys, step: int, totals, window: MetricWindow) -> None:
        generator = torch.Generator(device=self.accelerator.device)
        generator.manual_seed(_noise_seed(self.config.seed, self.accelerator.process_index, step, keys))
        try:
            slots = build_slots(self._to_device(batch))
            with self.accelerator.accumulate(self.model), self.accelerator.autocast():
                output = compute_loss(self.model, self.draft, slots, self.config.loss, generator, slot_totals=totals)
                if not torch.isfinite(output.loss):
                    raise MSDError(
                        f"the training loss became {float(output.loss.detach())} at step {step + 1} on samples "
                        f"{_describe(keys)}. Check these samples' features, or lower the learning rate."
                    )
                self.accelerator.backward(output.loss)
        except torch.OutOfMemoryError:
            raise MSDError(
                f"out of memory at step {step + 1} (micro-batch {self.config.micro_batch_size}, up to "
                f"{self.config.max_length} tokens). Lower micro_batch_size or max_length and raise "
                "gradient_accumulation, use mixed_precision bf16, or shard the optimizer with DeepSpeed ZeRO-2."
            ) from None
        window.add(output, samples=len(keys))

    def _optimizer_step(self) -> None:
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # float16's loss scaler skips steps with inf gradients
            self.scheduler.step()
        self.optimizer.zero_grad()

    def _after_step(self, progress: _Progress, window: MetricWindow, end_of_epoch: bool) -> None:
        config = self.config
        step = progress.step
        if step % config.log_every == 0 or end_of_epoch:
            metrics = window.report(self.accelerator)
            metrics["train/lr"] = self.scheduler.get_last_lr()[0]
            write_metrics(self.accelerator, metrics, step)
        if end_of_epoch or (config.eval_every and step % config.eval_every == 0):
            evaluation = self.evaluate()
            if evaluation:
                write_metrics(self.accelerator, evaluation, step)
        epoch_save = end_of_epoch and config.save_each_epoch
        if epoch_save or step == self.total_steps or (config.save_every and step % config.save_every == 0):
            self._save(progress)

    # -- evaluation, checkpoints ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 agreement of draft and target, and the loss, on each source's held-out samples (no noise).

        With unrolled steps, agreement of each later draft step is reported too (`eval/<source>_top1_step<s>`).
        """
        self.draft.eval()
        metrics = {}
        steps = self.config.loss.unroll_steps
        for source in self.sources.values():
            held_out = source.held_out[self.accelerator.process_index :: self.accelerator.num_processes]
            # loss x slots, then agreements and slots of each step
            totals = torch.zeros(1 + 2 * steps, dtype=torch.float64, device=self.accelerator.device)
            for start in range(0, len(held_out), self.config.micro_batch_size):
                samples = [source.dataset[int(index)] for index in held_out[start : start + self.config.micro_batch_size]]
                slots = build_slots(self._to_device(self.collate(samples)))
                with self.accelerator.autocast():
                    output = compute_loss(self.draft, self.draft, slots, self.config.loss, None, self.target_head)
                counts = [count for pair in zip(output.step_agreements, output.step_slots) for count in pair]
                totals += torch.tensor([float(output.mean_loss) * output.slots, *counts], dtype=torch.float64,
                                       device=totals.device)
            loss, *counts = self.accelerator.reduce(totals, reduction="sum").tolist()
            for step in range(1, steps + 1):
                agreements, slots = counts[2 * step - 2], counts[2 * step - 1]
                if slots:
                    suffix = "" if step == 1 else f"_step{step}"
                    metrics[f"eval/{source.name}_top1{suffix}"] = agreements / slots
            if counts[1]:
                metrics[f"eval/{source.name}_loss"] = loss / counts[1]
        self.draft.train()
        return metrics

    def _save(self, progress: _Progress) -> Path:
        state = {
            "step": progress.step,
            "position": progress.position.as_dict(),
            "draws_per_step": self.draws_per_step,
            "processes": self.accelerator.num_processes,
            "seed": self.config.seed,
            "order": self._order(),
            "config": self.config.as_dict(),
        }
        return save_checkpoint(
            self.accelerator, self.draft, self.output_dir, progress.step, state, self.config.keep_checkpoints
        )

    def _order(self) -> dict:
        """Return what decides the sample order besides the seed and batch geometry: source sizes, curriculum."""
        sizes = {self.sources[source].name: self.sources[source].size for source in sorted(self.sources)}
        return {"train_samples": sizes, "curriculum": asdict(self.curriculum.config)}

    def _resume(self, resume: str | Path | bool) -> _Progress:
        checkpoint = find_resume_checkpoint(resume, self.output_dir)
        state = read_trainer_state(checkpoint)
        newer = [path.name for path in list_checkpoints(self.output_dir) if checkpoint_step(path) > state["step"]]
        if newer:
            raise MSDError(
                f"cannot resume from {checkpoint}: {self.output_dir} already contains later checkpoints of a run that "
                f"went on from it ({', '.join(newer)}), and the resumed run would mix with them. Resume from the "
                "newest (--resume without a folder), move the later ones away, or pass another --output."
            )
        geometry = (("draws_per_step", self.draws_per_step), ("processes", self.accelerator.num_processes),
                    ("seed", self.config.seed))
        for name, current in geometry:
            if name in state and state[name] != current:
                raise MSDError(
                    f"cannot resume from {checkpoint}: it was trained with {name} {state[name]}, this run has "
                    f"{current}. Resume with the same micro_batch_size, gradient_accumulation, process count and "
                    "seed, or start a new run."
                )
        position = CurriculumPosition(**state["position"])
        reordered = changed_options(state["order"], self._order()) if "order" in state else []
        if reordered:
            self._check_reordered_resume(checkpoint, state, position, reordered)
        saved = DraftConfig.load(checkpoint / "draft")
        for name in ("num_layers", "draft_vocab_size", "decouple_visual", "input_layernorm"):
            if getattr(saved, name) != getattr(self.draft.config, name):
                raise MSDError(
                    f"cannot resume from {checkpoint}: its draft has {name} {getattr(saved, name)}, the draft of this "
                    f"run {getattr(self.draft.config, name)}. Build the trainer with the checkpoint's draft "
                    "(`msd train --resume` does) or start a new run."
                )
        changed = changed_options(state.get("config", {}), self.config.as_dict())
        if changed:
            logger.warning("resuming %s with changed training options: %s", checkpoint, "; ".join(changed))
        self.accelerator.load_state(str(checkpoint / "state"))
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint, state["step"], position.epoch + 1)
        return _Progress(step=state["step"], position=position)

    def _check_reordered_resume(self, checkpoint: Path, state: dict, position: CurriculumPosition, reordered) -> None:
        """Raise MSDError unless the finished epochs keep their lengths and the interrupted epoch keeps its plan.

        The schedule's step count and learning rate assume the finished epochs' lengths.
        """
        changes = "; ".join(reordered)
        epoch_start = state["step"] - position.step_in_epoch
        done = self.curriculum.epoch_starts(position.epoch)[-1]
        if done != epoch_start:
            raise MSDError(
                f"cannot resume from {checkpoint}: with the changed options ({changes}) its {position.epoch} finished "
                f"epochs would have taken {done} steps, not {epoch_start}, so the schedule would not fit the run. To "
                "train longer, set the curriculum's text_only and ramp explicitly (unset, they follow --epochs), or "
                "start a new run."
            )
        if position.step_in_epoch:
            saved = state["order"]
            if saved["train_samples"] != self._order()["train_samples"]:
                same_plan = False  # the plan's indices would point at other samples
            else:
                config = CurriculumConfig(**saved["curriculum"])
                before = Curriculum(config, *self.curriculum.sizes, self.draws_per_step, self.config.seed)
                old_plan = before.plan(position.epoch, epoch_start, position)
                new_plan = self.curriculum.plan(position.epoch, epoch_start, position)
                same_plan = np.array_equal(old_plan.sources, new_plan.sources) and np.array_equal(
                    old_plan.indices, new_plan.indices
                )
            if not same_plan:
                raise MSDError(
                    f"cannot resume from {checkpoint}: the rest of its epoch would come in another order ({changes}). "
                    "Resume with the same data folders, eval_samples, epochs and curriculum, resume from a checkpoint "
                    "at the end of an epoch, or start a new run."
                )
        logger.warning("resuming in epoch %d with changed order options: %s", position.epoch + 1, changes)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = self._truncate(batch)
        return {name: value.to(self.accelerator.device) for name, value in batch.items()}

    def _truncate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the batch's tensors cut to max_length tokens."""
        length = self.config.max_length
        batch = {name: value for name, value in batch.items() if torch.is_tensor(value)}
        for name in SEQUENCE_KEYS:
            batch[name] = batch[name][:, :length]
        batch["position_ids"] = batch["position_ids"][:, :, :length]
        return batch


class _PlanSamples(torch.utils.data.Dataset):
    """Samples addressed by (source, dataset index) keys."""

    def __init__(self, sources: dict[int, FeatureSource]):
        self.datasets = {source: value.dataset for source, value in sources.items()}

    def __getitem__(self, key: tuple[int, int]):
        source, index = key
        return self.datasets[source][index]

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets.values())


def changed_options(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """List options whose values differ between a checkpoint's saved config and this run's, as "name: old -> new"."""
    current = json.loads(json.dumps(current))  # tuples become lists, as in the saved JSON
    changed = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_options(old, new, f"{prefix}{name}.")
        elif old != new:
            changed.append(f"{prefix}{name}: {old!r} -> {new!r}")
    return changed


def _noise_seed(seed: int, rank: int, step: int, keys) -> int:
    """Derive a noise seed from the run seed, process, step and samples: resumed runs draw the same noise."""
    flat = [seed, rank, step] + [value for key in keys for value in key]
    return int(np.random.SeedSequence(flat).generate_state(1, dtype=np.uint64)[0] >> 1)


def _describe(keys) -> str:
    names = {TEXT: "text", MULTIMODAL: "multimodal"}
    return ", ".join(f"{names[source]}[{index}]" for source, index in keys)
