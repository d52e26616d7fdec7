"""Batch-invariant bfloat16 kernels for decoding on CPUs with native bfloat16 matrix units (AMX).

Terms. A *decoding forward* runs the target over a few new tokens appended to its KV cache: one token in plain
decoding, the n nodes of a draft tree in verification. Kernels are *batch-invariant* when every token of an n-token
forward gets the same bits as it would get in a one-token forward at the same place in the sequence.

Lossless speculative decoding needs that property. PyTorch's CPU kernels pick their blocking and their instruction
path from the number of rows, so a token verified inside a tree is rounded differently from the same token decoded
alone. In float32 the difference stays around 1e-7 and almost never flips a greedy choice. In bfloat16 it does: with
PyTorch's kernels, 13 of 20 bfloat16 decoding runs of the embedded default target drifted from plain decoding. Yet
bfloat16 is where a CPU with AMX makes verification cheap, because a weight read once serves 16 rows at about the cost
of one.

Two replacements make every decoding forward of at most `ROWS` tokens batch-invariant:

- `InvariantLinear`: the weight is reordered once into oneDNN's blocked layout, and an input of at most `ROWS` rows is
  zero-padded to exactly `ROWS` rows, so every decoding forward runs one kernel on one shape. Rows do not interact in
  a matrix product, so each row's result is the same whichever rows share the call. Longer inputs (prompts) run
  unpadded: plain decoding, speculative decoding and transformers' `generate` all prefill the same way.
- `invariant_attention` (registered with transformers as `ATTENTION_NAME`): each query row attends in its own batch
  entry, with one query, to the keys it may see gathered in cache order (the cached prefix, then its tree ancestors
  and itself), zero-padded to a multiple of `KEY_BLOCK` keys under the mask. A tree node therefore sees exactly the key
  layout it would see as the last token of plain decoding; padded keys add exact zeros.

Forwards of more than `ROWS` tokens after the prompt would not be invariant, so `SpeculativeGenerator` refuses trees
above `ROWS` nodes on a target using these kernels. The reordered weights are a second copy next to the originals,
which stay for the state dict, tied embeddings and the draft's borrowed LM head.

Cost of one forward of the embedded default target over n tokens on a 2-core Xeon with AMX (Emerald Rapids), after
48 generated tokens, milliseconds (float32 with PyTorch's kernels; bfloat16 with these):

    tokens per forward     1     3     8    16
    float32               34    37    56    65
    bfloat16, invariant   35    38    41    46
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from msd.errors import MSDError
from msd.targets.base import TargetAdapter

logger = logging.getLogger(__name__)

#: rows every decoding forward is padded to; the largest draft tree a target using these kernels can verify
ROWS = 16
#: attention key counts are padded to a multiple of this
KEY_BLOCK = 32
#: the attention implementation name registered with transformers
ATTENTION_NAME = "msd_batch_invariant"


def supported(device: torch.device | str = "cpu") -> bool:
    """True on a CPU whose oneDNN build runs bfloat16 matrix products natively (AVX-512 BF16 or AMX)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class InvariantLinear(nn.Module):
    """A bfloat16 linear layer whose result for each row does not depend on the other rows of a decoding forward.

    Keeps the wrapped layer's `weight` and `bias` parameters (same state-dict names, ties kept) and a reordered copy
    of the weight for oneDNN. The copy is made once: change the weights afterwards and the layer goes stale.
    """

    def __init__(self, linear: nn.Linear, rows: int = ROWS):
        super().__init__()
        if linear.weight.dtype != torch.bfloat16:
            raise MSDError(f"batch-invariant linear layers need bfloat16 weights, got {linear.weight.dtype}.")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.rows = rows
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1, self.in_features)  # (M, in)
        count = flat.shape[0]
        if 0 < count < self.rows:
            flat = torch.cat([flat, flat.new_zeros(self.rows - count, self.in_features)])  # (ROWS, in)
        output = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return output[:count].reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}"


def invariant_attention(module, query, key, value, attention_mask, **kwargs):
    """Scaled dot-product attention, one batch entry per query row (see the module docstring).

    query: (1, heads, q, D); key, value: (1, kv heads, kv, D), the last q of them the new tokens;
    attention_mask: None (causal), bool (True = attend) or additive, broadcastable to (1, 1, q, kv).
    Returns (1, q, heads, D) as transformers' attention functions do. Prompts (q > ROWS), batches and masks that hide
    part of the cached prefix go to transformers' own SDPA function unchanged.
    """
    batch, _, count, dim = query.shape
    kv = key.shape[2]
    prefix = kv - count  # keys already in the cache
    if batch != 1 or count > ROWS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is None:
        visible = torch.ones(count, count, dtype=torch.bool, device=query.device).tril()
    else:
        allowed = attention_mask[0, 0] if attention_mask.dtype == torch.bool else attention_mask[0, 0] == 0
        allowed = allowed.expand(count, kv)
        if not bool(allowed[:, :prefix].all()):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        visible = allowed[:, prefix:]  # (q, q): the new tokens each row attends to

    seen = visible.sum(-1)  # (q,) new tokens each row attends to: its ancestors and itself
    longest = int(seen.max())
    width = -(-(prefix + longest) // KEY_BLOCK) * KEY_BLOCK
    # For each row, the indices of the new tokens it attends to, in cache order (a stable sort puts them first).
    order = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices[:, :longest]  # (q, longest)

    def gather(states: torch.Tensor) -> torch.Tensor:
        """(1, kv heads, kv, D) -> (q, kv heads, width, D): per row, the prefix, its visible new tokens, zeros."""
        rows = states.new_empty(count, states.shape[1], width, dim)
        rows[:, :, :prefix] = states[0, :, :prefix]
        rows[:, :, prefix : prefix + longest] = states[0, :, prefix:][:, order].transpose(0, 1)
        rows[:, :, prefix + longest :] = 0
        return rows

    hidden = torch.arange(width, device=query.device)[None] >= (prefix + seen)[:, None]  # (q, width)
    mask = torch.zeros(count, 1, 1, width, dtype=query.dtype, device=query.device)
    mask.masked_fill_(hidden[:, None, None], torch.finfo(query.dtype).min)
    queries = query[0].transpose(0, 1)[:, :, None]  # (q, heads, 1, D)
    kwargs.pop("is_causal", None)
    output, _ = sdpa_attention_forward(
        module, queries, gather(key), gather(value), mask, is_causal=False, **kwargs
    )  # (q, 1, heads, D)
    return output.transpose(0, 1), None


AttentionInterface.register(ATTENTION_NAME, invariant_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_batch_invariant_kernels(target: TargetAdapter) -> int:
    """Switch a bfloat16 target's language model and LM head to the batch-invariant kernels, in place.

    Sets `target.max_tree_tokens` to `ROWS` and returns the number of linear layers replaced. The vision tower and
    projector keep their layers: they run once per prompt.
    """
    model = target.model
    if not supported(target.device):
        raise MSDError(
            "batch-invariant bfloat16 kernels need a CPU with native bfloat16 support (AVX-512 BF16 or AMX). "
            "Load the target in float32 instead (--dtype float32)."
        )
    changed = 0
    for parent in list(target.language_model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, InvariantLinear(child))
                changed += 1
    if type(model.get_output_embeddings()) is nn.Linear:
        model.set_output_embeddings(InvariantLinear(model.get_output_embeddings()))
        changed += 1
    model.set_attn_implementation({"text_config": ATTENTION_NAME})
    target.max_tree_tokens = ROWS
    logger.info("batch-invariant bfloat16 kernels: %d linear layers, attention %s", changed, ATTENTION_NAME)
    return changed
