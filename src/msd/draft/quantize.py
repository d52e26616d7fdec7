"""Weight-only int8 linear layers for drafting on CPU.

A draft forward over a few slots reads each weight matrix once and does little arithmetic with it, so on a CPU its
cost follows the weights' size. `Int8Linear` stores every output row as int8 values with one scale per row
(symmetric: the row's largest magnitude maps to 127) and multiplies bfloat16 inputs through PyTorch's
`_weight_int8pack_mm`, half the bytes of bfloat16 weights. That kernel's time grows with the number of input rows,
so products of more than `INT8_MAX_ROWS` rows (the prompt, wide tree levels) use oneDNN's bfloat16 kernel on
prepacked weights instead. The six products of one drafting step of the embedded default draft were timed on a
2-core Xeon with AMX, with other memory traffic in between so that the weights came from memory as in decoding. For
one row they took 0.57 ms in int8 against 0.88 ms in bfloat16, for four rows 0.73 against 0.88 ms and for five 0.94
against 0.91 ms. For 100 rows the fused gate and up product took ten times as long in int8.

Drafting tolerates the rounding: the target verifies every drafted token, so generated text stays the target's.
`_weight_int8pack_mm` needs input widths that are multiples of 16 (other widths crashed or gave wrong products in
torch 2.13), so such layers, and any layer whose product fails a check against the bfloat16 one, are not converted.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from msd.targets.batch_invariant import ROWS, InvariantLinear, supported

logger = logging.getLogger(__name__)

#: input widths `_weight_int8pack_mm` multiplies correctly are multiples of this
WIDTH_MULTIPLE = 16
#: products of at most this many rows use the int8 weights, larger ones the bfloat16 weights
INT8_MAX_ROWS = 4
#: inputs of more than `ROWS` rows (prompts) are zero-padded to a multiple of this many rows. oneDNN builds its kernel
#: for each new row count on first use, about 1.5 ms per layer on a 2-core Xeon, and prompt lengths vary.
ROW_BUCKET = 32
#: largest relative error (Frobenius norm) of the int8 product against the bfloat16 one that `to_int8` accepts
MAX_RELATIVE_ERROR = 0.05


class Int8Linear(nn.Module):
    """A bfloat16 linear layer that multiplies up to `INT8_MAX_ROWS` rows with int8 weights and per-row scales.

    Keeps the wrapped layer's `weight` and `bias` parameters (same state-dict names) beside an int8 copy. A copy
    reordered for oneDNN is made on the first product of more than `INT8_MAX_ROWS` rows. Change the weights afterwards
    and the layer goes stale, because neither copy is made again.
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.in_features = linear.weight.shape[1]
        self.out_features = linear.weight.shape[0]
        self.weight = linear.weight
        self.bias = linear.bias
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (out,)
        quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("quantized", quantized, persistent=False)
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)
        self.packed: torch.Tensor | None = None  # the weight reordered for oneDNN, made on first use

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int8Linear:
        """Wrap a bare (out, in) weight without bias, such as rows taken from an LM head."""
        linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return cls(linear)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in)
        count = flat.shape[0]
        if count > INT8_MAX_ROWS:
            if count > ROWS:  # a prompt: reuse oneDNN's kernel for a nearby row count
                flat = F.pad(flat, (0, 0, 0, -count % ROW_BUCKET))
            if self.packed is None:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), ROWS)
            output = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")[:count]
        else:
            output = torch._weight_int8pack_mm(flat, self.quantized, self.scales)  # (M, out)
            if self.bias is not None:
                output = output + self.bias
        return output.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def to_int8(linear: nn.Module) -> Int8Linear | None:
    """Return `linear` (a bfloat16 linear layer on the CPU) as an `Int8Linear`, or None when its input width is not
    supported or its int8 product fails a probe against the bfloat16 one."""
    weight = linear.weight
    if weight.dtype != torch.bfloat16 or not supported(weight.device) or weight.shape[1] % WIDTH_MULTIPLE:
        return None
    layer = Int8Linear(linear)
    probe = torch.randn(INT8_MAX_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0))
    probe = probe.to(torch.bfloat16)
    expected = F.linear(probe, weight.detach(), None if linear.bias is None else linear.bias.detach()).float()
    error = (layer(probe).float() - expected).norm() / expected.norm().clamp(min=1e-30)
    return layer if error <= MAX_RELATIVE_ERROR else None


def quantize_linear_layers(module: nn.Module) -> int:
    """Replace the linear layers (`nn.Linear`, `InvariantLinear`) inside `module` that `to_int8` converts by their
    `Int8Linear`, in place.

    Returns how many were replaced; the others stay as they are.
    """
    replacements = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) in (nn.Linear, InvariantLinear)
    ]
    replaced = 0
    for parent, name, child in replacements:
        layer = to_int8(child)
        if layer is not None:
            setattr(parent, name, layer)
            replaced += 1
    if replaced < len(replacements):
        logger.info("int8 drafting: %d of %d linear layers stay in bfloat16", len(replacements) - replaced,
                    len(replacements))
    return replaced

