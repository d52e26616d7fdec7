"""The MSD draft: a fusion layer and decoder layers of the target's family that predict the target's next feature.

Alignment. The target reads tokens x_0 .. x_{L-1} and produces last-layer features h_0 .. h_{L-1}; h_j predicts
x_{j+1}. Draft slot j pairs h_j with the next token x_{j+1} and predicts h_{j+1}:

    text slot (x_{j+1} is text):     input_j = fc([embed(x_{j+1}) ; h_j])        fc: 2H -> H, with bias
    visual slot (x_{j+1} is visual): input_j = v_{j+1}                          the target's projected visual embedding

A visual token comes from a bidirectional vision encoder, so pairing it with the feature before it carries no
left-to-right signal. Its own embedding is passed straight through instead. Slot j takes the position id of x_{j+1},
the token it embeds, so a visual slot keeps its image-grid position under Qwen2-VL's multimodal rotary scheme. With
1-D rotary positions this is the research code's numbering shifted by one, which rotary attention does not see.

The fused input runs through `num_layers` decoder layers (one in the research drafts). The token embedding and the
LM head belong to the target. The draft borrows them through `attach` and neither stores nor saves them. With a
reduced draft vocabulary the head is the target's rows for those tokens.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLRotaryEmbedding
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding

from msd.draft.config import DraftConfig
from msd.draft.quantize import Int8Linear, quantize_linear_layers, to_int8
from msd.errors import MSDError
from msd.files import atomic_save_tensors
from msd.targets.batch_invariant import InvariantLinear, pack_linear_layers
from msd.targets.cpu_linear import use_small_batch_linears

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
#: weight-name prefixes of drafts saved by earlier msd versions -> current prefixes
RENAMED_PREFIXES = {"layer.": "layers.0."}

#: language-model `model_type` -> (decoder layer, rotary embedding, position-id rows)
DECODER_LAYERS = {
    "llama": (LlamaDecoderLayer, LlamaRotaryEmbedding, 1),
    "mistral": (MistralDecoderLayer, MistralRotaryEmbedding, 1),
    "qwen2": (Qwen2DecoderLayer, Qwen2RotaryEmbedding, 1),
    "qwen2_vl_text": (Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding, 3),
    "qwen2_5_vl_text": (Qwen2_5_VLDecoderLayer, Qwen2_5_VLRotaryEmbedding, 3),
}


class DraftModel(nn.Module):
    """Fusion layer plus decoder layers; see the module docstring for the inputs at text and visual slots."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        if config.layer_family not in DECODER_LAYERS:
            raise MSDError(
                f"no draft decoder layer for language-model family {config.layer_family!r}; "
                f"supported: {', '.join(DECODER_LAYERS)}."
            )
        self.config = config
        layer_class, rotary_class, self.position_rows = DECODER_LAYERS[config.layer_family]
        text_config = config.build_text_config()
        hidden = config.hidden_size

        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layers = nn.ModuleList(layer_class(text_config, layer_idx=index) for index in range(config.num_layers))
        if not config.input_layernorm:
            self.layers[0].input_layernorm = nn.Identity()
        self.rotary_emb = rotary_class(config=text_config)
        if config.draft_vocab_size is not None:
            self.register_buffer("draft_to_target", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_to_target = None
        # Borrowed from the target by `attach`; kept out of the module tree so they are neither trained nor saved.
        self._shared: dict[str, torch.Tensor] = {}

    # -- the target's shared parts --------------------------------------------------------------------

    def attach(self, target, dtype: torch.dtype | None = None) -> DraftModel:
        """Check the draft fits `target` (a TargetAdapter), move to its device and to `dtype` (default: the target's),
        and borrow its frozen embedding and LM head."""
        self.config.check_fits(target)
        self.to(device=target.device, dtype=dtype or target.dtype)
        head = target.lm_head.weight.detach()
        if self.draft_to_target is not None:
            outside = self.draft_to_target[(self.draft_to_target < 0) | (self.draft_to_target >= head.shape[0])]
            if outside.numel():
                raise MSDError(
                    f"the draft's vocabulary map (draft_to_target) names target token ids outside the target's "
                    f"vocabulary of {head.shape[0]}, for example {int(outside[0])}. The draft file is damaged or was "
                    "edited. Use a draft written by msd train or msd convert."
                )
            head = head[self.draft_to_target.to(head.device)]  # (draft vocab, H): a small copy of the used rows
        self._shared = {"embed": target.embed_tokens.weight.detach(), "head": head}
        return self

    def clone(self) -> DraftModel:
        """Return a deep copy that shares the borrowed target tensors instead of copying them."""
        return copy.deepcopy(self, memo={id(tensor): tensor for tensor in self._shared.values()})

    def packed_copy(self) -> DraftModel:
        """Return a copy packed by `pack`. It shares the borrowed target tensors, and this draft stays as it is."""
        return self.clone().pack()

    def pack(self) -> DraftModel:
        """Switch this draft's linear layers and LM head to faster CPU kernels for bfloat16 drafting, in place, and
        return it.

        Layers get weight-only int8 (`msd.draft.quantize.Int8Linear`) where the weight's shape allows, and weights
        prepacked for oneDNN (`msd.targets.batch_invariant.InvariantLinear`) elsewhere, unpadded because drafting
        needs speed rather than batch invariance. A packed draft cannot be trained."""
        head = InvariantLinear.from_weight(self._require("head"), pad=False)
        quantize_linear_layers(self)
        pack_linear_layers(self, pad=False)  # the layers int8 does not take
        quantized_head = to_int8(head)
        self._shared["head_layer"] = head if quantized_head is None else quantized_head
        return self.requires_grad_(False)

    def use_small_batch(self, max_rows: int, pad_one_row: bool) -> DraftModel:
        """Switch this draft's linear layers and LM head to `msd.targets.cpu_linear.SmallBatchLinear` with a float32
        CPU target's measured choice, in place, and return it. Drafting multiplies one to a few rows at a time, the
        case those layers speed up."""
        use_small_batch_linears(self, max_rows, pad_one_row)
        weight = self._require("head")
        head = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        head.weight = nn.Parameter(weight, requires_grad=False)
        use_small_batch_linears(head, max_rows, pad_one_row)
        self._shared["head_layer"] = head
        return self

    @property
    def packed(self) -> bool:
        """Whether `pack` switched this draft's layers to msd's CPU kernels."""
        return isinstance(self.fc, (InvariantLinear, Int8Linear))

    @property
    def int8_head(self) -> bool:
        """Whether `pack` gave this draft's LM head int8 weights, so that other rows of the target's head can have
        them too (same width, checked once)."""
        return isinstance(self._shared.get("head_layer"), Int8Linear)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self._require("embed")).to(self.fc.weight.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits over the draft vocabulary (the target's, unless reduced): (..., H) -> (..., V_draft)."""
        head = self._require("head")
        if "head_layer" in self._shared:  # a packed copy
            return self._shared["head_layer"](hidden.to(head.dtype))
        return F.linear(hidden.to(head.dtype), head)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map indices into the draft vocabulary to target token ids."""
        if self.draft_to_target is None:
            return draft_ids
        return self.draft_to_target[draft_ids]

    def _require(self, name: str) -> torch.Tensor:
        if name not in self._shared:
            raise RuntimeError("the draft is not attached to a target; call draft.attach(target) first")
        return self._shared[name]

    # -- forward --------------------------------------------------------------------------------------

    def forward(
        self,
        token_ids: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        visual_embeds: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the target's next features.

        token_ids: (B, T) the next token of each slot.
        features: (B, T, H) the target's (or the draft's own) feature at each slot.
        position_ids: (P, B, T) with P the family's position rows.
        attention_mask: additive (B, 1, T, cached + T), or None for causal attention over the slots alone.
        visual_embeds: (B, T, H) and visual_mask: (B, T) bool, for visual slots.
        Returns the predicted features (B, T, H).
        """
        hidden = self.fuse_inputs(token_ids, features, visual_embeds, visual_mask)
        if attention_mask is None:
            attention_mask = causal_mask(token_ids.shape[1], hidden.dtype, hidden.device)[None, None]
        position_ids = position_ids if self.position_rows == 3 else position_ids[0]
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden

    def fuse_inputs(
        self,
        token_ids: torch.Tensor,
        features: torch.Tensor,
        visual_embeds: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder input of each slot (see the module docstring): token_ids (..., T), features (..., T, H),
        visual_embeds (..., T, H) and visual_mask (..., T) -> (..., T, H)."""
        hidden = self.fc(torch.cat([self.embed(token_ids), features.to(self.fc.weight.dtype)], dim=-1))
        if self.config.decouple_visual and visual_mask is not None and bool(visual_mask.any()):
            hidden = torch.where(visual_mask[..., None], visual_embeds.to(hidden.dtype), hidden)
        return hidden

    # -- files ----------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write config.json and model.safetensors; each file is written to a temporary name and renamed.

        dtype: cast floating-point weights to it in the file (float16 halves a float32 draft's size); integer
        tensors such as `draft_to_target` keep their dtype. None writes the weights as they are.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, tensor in self.state_dict().items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[name] = tensor.detach().contiguous().cpu()
        atomic_save_tensors(folder / WEIGHTS_NAME, state, metadata={"format": "pt", "msd_draft": "1"})
        self.config.save(folder)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> DraftModel:
        """Load a draft saved by `save_pretrained`; missing or unexpected weights raise MSDError."""
        folder = Path(folder)
        if folder.is_file():
            raise MSDError(
                f"the draft path is a file, not a folder: {folder}. Pass the folder that contains config.json and "
                f"{WEIGHTS_NAME}, as msd train or msd convert write it."
            )
        if not folder.is_dir():
            raise MSDError(f"draft folder not found: {folder}. Pass the folder written by msd train or msd convert.")
        config = DraftConfig.load(folder)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise MSDError(
                f"no draft weights at {weights}. Copy {WEIGHTS_NAME} into the draft folder with its config.json, or "
                "pass the folder written by msd train or msd convert."
            )
        try:
            state = rename_legacy_weights(load_file(str(weights)))
        except (SafetensorError, OSError) as error:
            raise MSDError(
                f"cannot read the draft weights in {weights}: the file is truncated or corrupt ({error}). Copy the "
                "draft folder again, or save it again with msd train or msd convert."
            ) from None
        try:
            model = cls(config)
        except (ValueError, TypeError, KeyError, StrictDataclassError) as error:  # transformers rejected it
            raise MSDError(
                f"invalid draft config in {folder}: {error}. Use the config.json written with the weights by msd train "
                "or msd convert."
            ) from None
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise MSDError(
                f"draft weights in {weights} do not match its config: missing {missing or 'none'}, "
                f"unexpected {unexpected or 'none'}."
            )
        shapes = model.state_dict()
        mismatched = [
            f"{name} {tuple(state[name].shape)} (config: {tuple(shapes[name].shape)})"
            for name in sorted(expected)
            if state[name].shape != shapes[name].shape
        ]
        if mismatched:
            raise MSDError(
                f"draft weights in {weights} do not match the sizes in its config: {', '.join(mismatched[:3])}"
                f"{' and more' if len(mismatched) > 3 else ''}. Keep config.json and model.safetensors from the "
                "same msd train or msd convert run."
            )
        model.load_state_dict(state, strict=True)
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device).eval()


def rename_legacy_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename weights saved by earlier msd versions (see `RENAMED_PREFIXES`); other names pass unchanged."""
    renamed = {}
    for name, tensor in state.items():
        for old, new in RENAMED_PREFIXES.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        renamed[name] = tensor
    return renamed


def causal_mask(length: int, dtype: torch.dtype, device: torch.device, cached: int = 0) -> torch.Tensor:
    """Build an additive (length, cached + length) mask: each new slot attends to the cache and the slots up to itself."""
    allowed = torch.ones(length, cached + length, dtype=torch.bool, device=device)
    allowed[:, cached:] = torch.tril(allowed[:, cached:])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
