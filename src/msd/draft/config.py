"""The draft's configuration, stored as `config.json` beside its weights, and its fit check against a target."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from msd.errors import MSDError
from msd.files import atomic_write_text

CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


@dataclass
class DraftConfig:
    """Everything needed to rebuild an MSD draft without its target.

    target_model_type: the target's `model_type` (for example "llava" or "qwen2_vl").
    text_config: the target language model's config as a dict; the draft's decoder layers are built from it.
    decouple_visual: True for MSD (visual positions take the target's projected visual embeddings directly); False
        for the EAGLE-style ablation that fuses the image token's embedding with the target feature everywhere.
    input_layernorm: False removes the first decoder layer's input norm, as in EAGLE-1/2 research checkpoints.
    draft_vocab_size: size of a reduced draft vocabulary (the draft scores only those target tokens), or None to
        score the target's whole vocabulary. The map to target ids is stored with the weights.
    num_layers: decoder layers stacked after the fusion layer; research drafts have one.
    """

    target_model_type: str
    text_config: dict
    decouple_visual: bool = True
    input_layernorm: bool = True
    draft_vocab_size: int | None = None
    num_layers: int = 1
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise MSDError(f"the draft's num_layers must be a whole number of at least 1, got {self.num_layers!r}.")

    @classmethod
    def for_target(cls, target, **options) -> DraftConfig:
        """Build a config whose decoder layer matches the target's language model (`target` is a TargetAdapter)."""
        text_config = target.text_config.to_dict()
        text_config.pop("_name_or_path", None)  # the folder the target was loaded from: not part of the draft
        return cls(target_model_type=target.config.model_type, text_config=text_config, **options)

    @property
    def hidden_size(self) -> int:
        return self.text_config["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.text_config["vocab_size"]

    @property
    def layer_family(self) -> str:
        return self.text_config["model_type"]

    def build_text_config(self) -> PretrainedConfig:
        """Build the transformers config object for the decoder layer and its rotary embedding."""
        options = {key: value for key, value in self.text_config.items() if key != "model_type"}
        # The draft's own layer stack: every layer attends to the whole sequence, whatever the target's layer types.
        options["num_hidden_layers"] = self.num_layers
        if "layer_types" in options:
            options["layer_types"] = ["full_attention"] * self.num_layers
        config = AutoConfig.for_model(self.layer_family, **options)
        config._attn_implementation = "sdpa"
        return config

    def save(self, folder: str | Path) -> None:
        text = json.dumps({"msd_draft": True, **asdict(self)}, indent=2, sort_keys=True) + "\n"
        atomic_write_text(Path(folder) / CONFIG_NAME, text)

    @classmethod
    def load(cls, folder: str | Path) -> DraftConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise MSDError(f"no draft config at {path}. Pass the folder written by msd train or msd convert.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise MSDError(
                f"invalid JSON in draft config {path}: {error}. The file is damaged: copy it again from where the "
                "draft came from, or export the draft again (msd train writes it, msd convert for research drafts)."
            ) from None
        if not data.pop("msd_draft", False):
            raise MSDError(
                f"{path} is not an msd draft config. Research-format (EAGLE-style) checkpoints must be converted "
                "first with `msd convert`."
            )
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise MSDError(f"draft {folder} uses format version {version}; upgrade msd to read it.")
        try:
            return cls(**data)
        except TypeError as error:
            raise MSDError(
                f"invalid draft config {path}: {error}. Copy the file again from where the draft came from, or export "
                "the draft again (msd train writes it, msd convert for research drafts)."
            ) from None

    def check_fits(self, target) -> None:
        """Raise MSDError unless this draft can serve `target` (a TargetAdapter)."""
        problems = []
        if self.target_model_type != target.config.model_type:
            problems.append(f"model type {self.target_model_type!r} (target: {target.config.model_type!r})")
        if self.layer_family != target.text_config.model_type:
            problems.append(
                f"language-model family {self.layer_family!r} (target: {target.text_config.model_type!r})"
            )
        if self.hidden_size != target.hidden_size:
            problems.append(f"hidden size {self.hidden_size} (target: {target.hidden_size})")
        if self.vocab_size != target.vocab_size:
            problems.append(f"vocabulary size {self.vocab_size} (target: {target.vocab_size})")
        if problems:
            raise MSDError(
                "the draft does not fit this target, which differs from the one it was built for in "
                + "; ".join(problems) + ". Use a draft trained for this target, or train one with `msd train`."
            )
