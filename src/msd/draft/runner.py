"""Drafting-time forward of an MSD draft: its own key-value cache and fused projections.

A draft forward during decoding covers a handful of slots, so its cost is the fixed cost of each operation rather
than arithmetic: reading each weight matrix once and dispatching each small operation. The decoder layers of
transformers pay for generality on every call (a `DynamicCache` that concatenates, `repeat_kv`, one product per
projection). `DraftRunner` runs the same layers with

- one product for the query, key and value projections and one for the gate and up projections (fused weights made
  once at construction);
- keys and values written in place into a preallocated cache, so dropping a cycle's tree slots only moves a length;
- grouped-query attention in one `scaled_dot_product_attention` call (`enable_gqa`), without copying key heads.

The result equals the module forward up to floating-point rounding. Drafts with multimodal rotary positions
(Qwen2-VL) or of a family not listed in `FAST_FAMILIES` run through the module forward with a `DynamicCache` behind
the same interface, and so do drafts on a device other than the CPU. Either way the target verifies every drafted
token, so the choice does not change generated text.

On the embedded default draft next to its bfloat16 target (2-core Xeon with AMX, int8 weights where
`msd.draft.quantize` allows), drafting took about 4.8 ms per cycle against 5.8 ms through the module forward with
prepacked bfloat16 weights. Both were timed inside decoding of the benchmark's four questions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from msd.draft.model import DraftModel
from msd.draft.quantize import Int8Linear, to_int8
from msd.targets.base import truncate_cache
from msd.targets.batch_invariant import InvariantLinear
from msd.targets.cpu_linear import SmallBatchLinear, use_small_batch_linears

#: language-model families whose decoder layer `DraftRunner` reproduces: pre-norm attention and gated MLP,
#: rotary positions on one position row
FAST_FAMILIES = ("llama", "mistral", "qwen2")
#: slots the cache is first allocated for; it doubles when a sequence outgrows it
FIRST_CAPACITY = 256


class DraftRunner:
    """A draft's drafting-time forward with a cache kept across calls (see the module docstring).

    >>> runner = DraftRunner(draft)              # an attached draft, in eval mode
    >>> hidden = runner.extend(tokens, features, positions, mask)   # (T, H) predicted features
    >>> runner.truncate(length)                  # drop every slot after the first `length`
    """

    def __init__(self, draft: DraftModel):
        self.draft = draft
        self.length = 0  # slots in the cache
        self.fast = fast_path_fits(draft)
        self.layers = [FusedLayer(layer) for layer in draft.layers] if self.fast else []
        self.cache: DynamicCache | None = None
        self.keys: torch.Tensor | None = None  # (layers, kv heads, capacity, D)
        self.values: torch.Tensor | None = None

    def reset(self) -> None:
        """Drop every slot."""
        self.length = 0
        self.cache = None if self.fast else DynamicCache()

    def truncate(self, length: int) -> None:
        """Keep the first `length` slots."""
        if length > self.length:
            raise ValueError(
                f"cannot keep {length} slots: the draft cache contains {self.length}. Pass a length of at most "
                f"{self.length}."
            )
        if not self.fast:
            truncate_cache(self.cache, length)
        self.length = length

    @torch.no_grad()
    def extend(
        self,
        token_ids: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        visual_embeds: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append T slots and return the draft's predicted features at them.

        token_ids: (T,) target ids; features: (T, H); positions: (P, T) with P the family's position rows;
        mask: additive (T, length + T) over the cached slots and the new ones;
        visual_embeds (T, H) and visual_mask (T,) bool for visual slots. Returns (T, H).
        """
        count = token_ids.shape[0]
        if mask.shape[-1] != self.length + count:
            raise ValueError(
                f"the mask covers {mask.shape[-1]} slots, but the draft cache contains {self.length} and {count} are "
                f"new. Build it over {self.length + count} slots."
            )
        if not self.fast:
            self.cache = self.cache if self.cache is not None else DynamicCache()
            hidden = self.draft(
                token_ids[None],
                features[None],
                positions[:, None],
                attention_mask=mask[None, None],
                cache=self.cache,
                visual_embeds=None if visual_embeds is None else visual_embeds[None],
                visual_mask=None if visual_mask is None else visual_mask[None],
            )[0]
            self.length += count
            return hidden

        hidden = self.draft.fuse_inputs(token_ids, features, visual_embeds, visual_mask)  # (T, H)
        self._reserve(self.length + count)
        cos, sin = self.draft.rotary_emb(hidden, positions[:1])  # (1, T, D) each
        mask = mask[None, None]  # (1, 1, T, length + T)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, mask, self.keys[index], self.values[index], self.length)
        self.length += count
        return hidden

    def _reserve(self, slots: int) -> None:
        """Make room for `slots` cached slots and keep the cached ones."""
        if self.keys is not None and self.keys.shape[2] >= slots:
            return
        capacity = max(slots, FIRST_CAPACITY, 0 if self.keys is None else 2 * self.keys.shape[2])
        first = self.layers[0]
        weight = self.draft.fc.weight
        shape = (len(self.layers), first.kv_heads, capacity, first.head_dim)
        keys = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        values = torch.empty_like(keys)
        if self.keys is not None:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values


def fast_path_fits(draft: DraftModel) -> bool:
    """True when `DraftRunner` can run the draft's decoder layers itself."""
    if draft.config.layer_family not in FAST_FAMILIES or draft.position_rows != 1:
        return False
    # NOTE: these fusions were timed on CPUs only, so drafts on GPUs keep the module forward.
    if draft.fc.weight.device.type != "cpu":
        return False
    for layer in draft.layers:
        attention = layer.self_attn
        if hasattr(attention, "q_norm"):  # per-head query and key norms, which `FusedLayer` does not apply
            return False
    return True


class FusedLayer:
    """One decoder layer's weights, with the query-key-value and gate-up projections fused."""

    def __init__(self, layer: nn.Module):
        attention, mlp = layer.self_attn, layer.mlp
        self.head_dim = attention.head_dim
        self.heads = attention.q_proj.weight.shape[0] // self.head_dim
        self.kv_heads = attention.k_proj.weight.shape[0] // self.head_dim
        self.scaling = attention.scaling
        self.qkv = fuse_linear([attention.q_proj, attention.k_proj, attention.v_proj])
        self.output = attention.o_proj
        self.gate_up = fuse_linear([mlp.gate_proj, mlp.up_proj])
        self.intermediate = mlp.gate_proj.weight.shape[0]
        self.down = mlp.down_proj
        self.act = mlp.act_fn
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm

    def __call__(self, hidden, cos, sin, mask, keys, values, cached: int) -> torch.Tensor:
        """hidden (T, H); cos, sin (1, T, D); mask (1, 1, T, cached + T); keys, values (kv heads, capacity, D)."""
        count = hidden.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        query, key, value = self.qkv(rms_norm(self.input_norm, hidden)).split([q_size, kv_size, kv_size], dim=-1)
        query = rotate(query.view(count, self.heads, self.head_dim).transpose(0, 1), cos, sin)  # (heads, T, D)
        key = rotate(key.view(count, self.kv_heads, self.head_dim).transpose(0, 1), cos, sin)  # (kv heads, T, D)
        keys[:, cached : cached + count] = key
        values[:, cached : cached + count] = value.view(count, self.kv_heads, self.head_dim).transpose(0, 1)
        attended = F.scaled_dot_product_attention(
            query[None],
            keys[None, :, : cached + count],
            values[None, :, : cached + count],
            attn_mask=mask,
            scale=self.scaling,
            enable_gqa=True,
        )  # (1, heads, T, D)
        hidden = hidden + self.output(attended[0].transpose(0, 1).reshape(count, q_size))
        gate, up = self.gate_up(rms_norm(self.post_norm, hidden)).split(self.intermediate, dim=-1)
        return hidden + self.down(self.act(gate) * up)


def fuse_linear(layers: list[nn.Module]) -> nn.Module:
    """Build one linear layer that computes the outputs of `layers` (which share their input) side by side."""
    weight = torch.cat([layer.weight for layer in layers]).detach()
    biases = [layer.bias for layer in layers]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else weight.new_zeros(layer.weight.shape[0]) for b, layer in zip(biases, layers)]
    ).detach()
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    fused.requires_grad_(False)
    if all(isinstance(layer, Int8Linear) for layer in layers):
        quantized = to_int8(fused)
        if quantized is not None:
            return quantized
    if any(isinstance(layer, (InvariantLinear, Int8Linear)) for layer in layers):  # a packed draft
        return InvariantLinear(fused, pad=False)
    if all(isinstance(layer, SmallBatchLinear) for layer in layers):  # next to a float32 CPU target
        use_small_batch_linears(fused, layers[0].max_rows, layers[0].pad_one_row)
    return fused

def rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply a decoder layer's RMS norm (or its identity) in float32, as the family's module does."""
    if not hasattr(norm, "variance_epsilon"):
        return norm(hidden)
    normalized = F.rms_norm(hidden.float(), hidden.shape[-1:], eps=norm.variance_epsilon)
    return norm.weight * normalized.to(hidden.dtype)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (heads, T, D) states with cos, sin (1, T, D)."""
    first, second = states.chunk(2, dim=-1)
    return states * cos + torch.cat([-second, first], dim=-1) * sin
