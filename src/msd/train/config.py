"""Training hyper-parameters, read from a JSON or YAML file with command-line overrides."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from msd.errors import MSDError
from msd.train.curriculum import CurriculumConfig
from msd.train.loss import LossConfig
from msd.train.option_types import check_field_types

MIXED_PRECISION = ("no", "bf16", "fp16")
#: dtypes the final draft can be written in
SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `msd train` needs besides the data folders, the target and the output folder.

    The defaults are the MSD research hyper-parameters: AdamW with lr 5e-5 and betas (0.9, 0.95), 2000 warm-up steps,
    micro-batch 2, gradient accumulation 2, gradient clipping at norm 0.5, bf16, sequences up to 2048 tokens, 40
    epochs. One optimizer step consumes micro_batch_size x gradient_accumulation x processes samples.
    """

    epochs: int = 40
    max_steps: int | None = None  # stop after this many optimizer steps, whatever the epoch
    micro_batch_size: int = 2
    gradient_accumulation: int = 2
    learning_rate: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 2000
    lr_schedule: str = "linear"  # a transformers `get_scheduler` name; linear decays to 0 at the last step
    max_grad_norm: float = 0.5
    mixed_precision: str = "bf16"
    max_length: int = 2048  # longer sequences are cut to their first max_length tokens
    seed: int = 0
    save_every: int = 1000  # optimizer steps between checkpoints; 0 turns step checkpoints off
    save_each_epoch: bool = True  # also save a checkpoint at the end of every epoch
    keep_checkpoints: int = 3
    eval_every: int = 0  # optimizer steps between held-out evaluations; 0 evaluates at epoch ends only
    eval_samples: int = 64  # held-out samples per source, at most a tenth of it (one in a small source)
    log_every: int = 10
    num_workers: int = 0
    input_layernorm: bool = True  # False builds the EAGLE-1/2 layout without the first decoder layer's input norm
    draft_layers: int | None = None  # decoder layers of a fresh draft; None builds one, as in the research drafts
    draft_vocab_size: int | None = None  # a fresh draft's reduced vocabulary (msd.train.vocab); None: the target's
    decouple_visual: bool = True  # a fresh draft's visual handling; False trains the non-decoupled (EAGLE) ablation
    save_dtype: str | None = None  # dtype of the final draft/ weights, one of SAVE_DTYPES (None: the training dtype)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def __post_init__(self):
        check_field_types(self, "training option")
        positive = ("epochs", "micro_batch_size", "gradient_accumulation", "max_length", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise MSDError(f"training option {name} must be at least 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "save_every", "eval_every", "eval_samples", "num_workers", "weight_decay"):
            if getattr(self, name) < 0:
                raise MSDError(f"training option {name} must be zero or positive, got {getattr(self, name)}.")
        if self.max_length < 3:
            raise MSDError(
                f"training option max_length must be at least 3 tokens (one training slot), got {self.max_length}."
            )
        if self.draft_layers is not None and self.draft_layers < 1:
            raise MSDError(f"training option draft_layers must be at least 1, got {self.draft_layers}.")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 2:
            raise MSDError(f"training option draft_vocab_size must be at least 2, got {self.draft_vocab_size}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise MSDError(f"training option max_steps must be at least 1, got {self.max_steps}.")
        if self.learning_rate <= 0:
            raise MSDError(f"training option learning_rate must be positive, got {self.learning_rate}.")
        if self.max_grad_norm <= 0:
            raise MSDError(f"training option max_grad_norm must be positive, got {self.max_grad_norm}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise MSDError(
                f"training option mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                f"got {self.mixed_precision!r}."
            )

        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise MSDError(
                f"training option save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}."
            )

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build a config from plain values; unknown keys raise MSDError naming them."""
        data = dict(data)
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MSDError(f"unknown training options {unknown}; valid options: {', '.join(sorted(known))}.")
        for name, kind in (("loss", LossConfig), ("curriculum", CurriculumConfig)):
            if name not in data:
                continue
            if not isinstance(data[name], dict):
                raise MSDError(f"training option {name} must be a mapping of option names to values.")
            options = {item.name for item in fields(kind)}
            unknown = sorted(set(data[name]) - options)
            if unknown:
                raise MSDError(f"unknown {name} options {unknown}; valid {name} options: {', '.join(sorted(options))}.")
        try:
            if "loss" in data:
                data["loss"] = LossConfig(**data["loss"])
            if "curriculum" in data:
                data["curriculum"] = CurriculumConfig(**data["curriculum"])
            if "betas" in data:
                data["betas"] = tuple(data["betas"])
            return cls(**data)
        except TypeError as error:
            raise MSDError(f"invalid training options: {error}") from None

    def with_overrides(self, **overrides) -> TrainConfig:
        """Return a copy with the given top-level options replaced. None values are ignored."""
        return replace(self, **{name: value for name, value in overrides.items() if value is not None})


#: keys of a transformers model config, none of which is a training option
MODEL_CONFIG_KEYS = {"architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}


def load_train_config(path: str | Path | None) -> TrainConfig:
    """Read a JSON or YAML (.yaml / .yml, needs PyYAML) training config; None gives the research defaults."""
    if path is None:
        return TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise MSDError(f"training config not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise MSDError(f"reading {path} needs PyYAML: pip install pyyaml, or write the config as JSON.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise MSDError(f"invalid YAML in training config {path}: {error}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise MSDError(f"invalid JSON in training config {path}: {error}") from None
    if not isinstance(data, dict):
        raise MSDError(f"training config {path} must hold a mapping of option names to values.")
    if MODEL_CONFIG_KEYS & set(data) and not set(data) & {item.name for item in fields(TrainConfig)}:
        raise MSDError(
            f"{path} is a model config (it sets {', '.join(sorted(MODEL_CONFIG_KEYS & set(data)))}), such as the "
            "research pipeline's draft-layer config.json. msd builds the draft from the target's config, and --config "
            "takes training options: start from configs/train_research.yaml."
        )
    try:
        return TrainConfig.from_dict(data)
    except MSDError as error:
        raise MSDError(f"training config {path}: {error}") from None
