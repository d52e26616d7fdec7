"""Linear layers that stay fast for forwards over a few tokens on a CPU.

Tree verification runs the target over 2-8 tokens at a time. On the CPU msd is developed on (2-core Zen 3, AVX2,
torch 2.13.0 CPU wheel), `F.linear(x, W)` with 2-4 input rows cost about as much as 2-4 separate single-row calls.
The same product computed as `(W @ x.T).T` runs another kernel, whose cost grows far more slowly with the rows.
Forward times of the 135M-parameter embedded target there (float32, a 150-token cache, median of 9):

    rows per forward          1     2     4     8
    F.linear, whole forward   63    96    99   101  ms
    W @ x.T, whole forward    60    66    68    83  ms

`SmallBatchLinear` takes the second form for inputs of at most `max_rows` rows and `F.linear` otherwise. Both compute
the same product, but in a different summation order, so results can differ in the last bits. Plain decoding and
tree verification use the same layers, and transformers' `generate` on the same model object does too, so outputs
stay identical to decoding with the model as loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from msd.errors import MSDError

#: rows up to which the transposed product is used by default (at 12 rows F.linear was faster again)
DEFAULT_MAX_ROWS = 8


class SmallBatchLinear(nn.Linear):
    """An `nn.Linear` that computes `(W @ x.T).T` for inputs of at most `max_rows` rows."""

    max_rows: int = DEFAULT_MAX_ROWS

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // self.in_features
        if rows == 0 or rows > self.max_rows:
            return super().forward(input)
        output = torch.matmul(self.weight, input.reshape(rows, self.in_features).T).T  # (rows, out_features)
        if self.bias is not None:
            output = output + self.bias
        return output.reshape(*input.shape[:-1], self.out_features)


def use_small_batch_linears(module: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Switch every plain `nn.Linear` inside `module` to `SmallBatchLinear`, in place; returns how many changed.

    The layers keep their parameters (tied weights stay tied), hooks and state-dict names, so saving and loading are
    unaffected. `max_rows` 0 leaves the module unchanged.
    """
    if max_rows < 0:
        raise MSDError(f"the CPU linear row limit must be zero or positive, got {max_rows}.")
    if max_rows == 0:
        return 0
    changed = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = SmallBatchLinear
            layer.max_rows = max_rows
            changed += 1
    return changed
