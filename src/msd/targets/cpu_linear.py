"""Linear layers that stay fast for forwards over a few tokens on a CPU.

Tree verification runs the target over 2-8 tokens at a time. On the CPU msd is developed on (2-core Zen 3, AVX2,
torch 2.13.0 CPU wheel), `F.linear(x, W)` with 2-4 input rows cost about as much as 2-4 separate single-row calls.
The same product computed as `(W @ x.T).T` runs another kernel, whose cost grows far more slowly with the rows.
Forward times of the 135M-parameter embedded target there (float32, a 150-token cache, median of 9):

    rows per forward          1     2     4     8
    F.linear, whole forward   63    96    99   101  ms
    W @ x.T, whole forward    60    66    68    83  ms

On a 2-core Xeon with AVX-512 and AMX (Emerald Rapids, CPU family 6 model 207, same wheel, 2 threads) it is the
other way round:

    rows per forward          1     2     4     8
    F.linear, whole forward   27    29    37    44  ms
    W @ x.T, whole forward    29    57    58    58  ms

A single row is a case of its own. Both forms then take a matrix-vector path, and on a 2-core Zen 4 EPYC (AVX-512,
same wheel) that path read the weights at about a third of the speed of a two-row product: 32 MLP weights of
1,536 x 576 took 10.0 ms for one row and 3.9 ms for two rows as `W @ x.T`. Adding a zero row makes a one-row
product take the matrix-matrix path. On the Zen 3 CPU above it would not pay (60 ms for a one-row forward against 66
for two rows).

So the choice is measured on the machine at load time: `choose_small_batch` times the products over the model's own
weights (`load_target(cpu_linear_rows="auto")`, the default).

`SmallBatchLinear` takes the second form for inputs of at most `max_rows` rows, pads a single row to two when
`pad_one_row` is set, and uses `F.linear` otherwise. The forms compute the same product, but in different summation
orders, so results can differ in the last bits. Plain decoding, tree verification and transformers' `generate` on
the same model object use the same layers. A one-row step and a tree forward still take different forms, so their
logits can differ in the last bits (up to about 3e-5 on the embedded target in float32), and a greedy token can then
change only at such a near tie.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msd.errors import MSDError

logger = logging.getLogger(__name__)

#: the `cpu_linear_rows` value that measures the row limit at load time
AUTO = "auto"
#: row counts `choose_small_batch` times: 1 for the padded single row, the others are the row limits it can pick
#: (on the Zen 3 CPU, F.linear was faster again at 12 rows)
CANDIDATE_ROWS = (1, 2, 4, 8)
DEFAULT_MAX_ROWS = 8
#: the transposed product must take at most this share of F.linear's time to be used
REQUIRED_RATIO = 0.9
#: weight matrices timed per pass, enough that they do not all fit in the CPU's caches
TIMED_WEIGHTS = 32


class SmallBatchLinear(nn.Linear):
    """An `nn.Linear` that computes `(W @ x.T).T` for inputs of at most `max_rows` rows, a single row padded with a
    zero row when `pad_one_row` is set."""

    max_rows: int = DEFAULT_MAX_ROWS
    pad_one_row: bool = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // self.in_features
        if rows == 0 or rows > max(self.max_rows, int(self.pad_one_row)):
            return super().forward(input)
        # Row-major rows: the output below is a transposed view, and MKL multiplied a next layer's input in that
        # layout 4.5 times slower (the MLP's down projection on two rows, on the Zen 4 CPU).
        flat = input.reshape(rows, self.in_features).contiguous()
        if rows == 1 and self.pad_one_row:
            flat = F.pad(flat, (0, 0, 0, 1))  # (2, in): the matrix-matrix path (see the module docstring)
        output = torch.matmul(self.weight, flat.T).T[:rows]  # (rows, out_features)
        if self.bias is not None:
            output = output + self.bias
        return output.reshape(*input.shape[:-1], self.out_features)


def use_small_batch_linears(module: nn.Module, max_rows: int = DEFAULT_MAX_ROWS, pad_one_row: bool = False) -> int:
    """Switch every plain `nn.Linear` inside `module` to `SmallBatchLinear`, in place; returns how many changed.

    The layers keep their parameters (tied weights stay tied), hooks and state-dict names, so saving and loading are
    unaffected. `max_rows` 0 without `pad_one_row` leaves the module unchanged.
    """
    if max_rows < 0:
        raise MSDError(f"the CPU linear row limit must be zero or positive, got {max_rows}.")
    if max_rows == 0 and not pad_one_row:
        return 0
    changed = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = SmallBatchLinear
            layer.max_rows = max_rows
            layer.pad_one_row = pad_one_row
            changed += 1
    return changed


def time_products(
    module: nn.Module, rows: Sequence[int] = CANDIDATE_ROWS, repeats: int = 5
) -> dict[int, tuple[float, float]]:
    """Time `F.linear` and `(W @ x.T).T` over the module's weights, per row count: {rows: (linear s, transposed s)}.
    For one row, the transposed product runs on the row padded with a zero row, as `pad_one_row` computes it.

    The timed weights are those of the most common weight shape (by parameters), such as a decoder's MLP matrices,
    up to `TIMED_WEIGHTS` of them per pass, so the timing reads weights from memory as a forward does. Each entry is
    the median of `repeats` passes after one warm-up pass.
    """
    layers = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
    if not layers:
        return {}
    parameters = Counter()
    for layer in layers:
        parameters[tuple(layer.weight.shape)] += layer.weight.numel()
    shape = parameters.most_common(1)[0][0]
    weights = [layer.weight for layer in layers if tuple(layer.weight.shape) == shape][:TIMED_WEIGHTS]

    def run_pass(inputs: torch.Tensor, transposed: bool) -> float:
        started = time.perf_counter()
        for weight in weights:
            if transposed:
                torch.matmul(weight, inputs.T)
            else:
                F.linear(inputs, weight)
        return time.perf_counter() - started

    times = {}
    with torch.inference_mode():
        for count in rows:
            inputs = torch.randn(count, shape[1], dtype=weights[0].dtype, device=weights[0].device)
            results = []
            for transposed in (False, True):
                timed = F.pad(inputs, (0, 0, 0, 1)) if transposed and count == 1 else inputs
                run_pass(timed, transposed)
                results.append(statistics.median(run_pass(timed, transposed) for _ in range(repeats)))
            times[count] = (results[0], results[1])
    return times


def pick_max_rows(times: Mapping[int, tuple[float, float]]) -> int:
    """Return the largest row count up to which the transposed product beat F.linear at every timed count of 2 rows
    or more.

    The transposed product wins at a row count when it took at most `REQUIRED_RATIO` of F.linear's time. Returns 0,
    which keeps PyTorch's layers for several rows, when it did not win at the smallest count.
    """
    chosen = 0
    for count in sorted(count for count in times if count > 1):
        linear, transposed = times[count]
        if transposed > REQUIRED_RATIO * linear:
            break
        chosen = count
    return chosen


def pick_pad_one_row(times: Mapping[int, tuple[float, float]]) -> bool:
    """Return whether a single row padded to two beat F.linear on one row, by the margin `pick_max_rows` requires."""
    if 1 not in times:
        return False
    linear, padded = times[1]
    return padded <= REQUIRED_RATIO * linear


def choose_small_batch(module: nn.Module) -> tuple[int, bool]:
    """Measure `max_rows` and `pad_one_row` for `use_small_batch_linears` on this machine (see `time_products`)."""
    times = time_products(module)
    max_rows, pad_one_row = pick_max_rows(times), pick_pad_one_row(times)
    ratios = ", ".join(f"{count} rows: {transposed / linear:.2f}" for count, (linear, transposed) in times.items())
    chosen = f"for inputs of at most {max_rows} rows" if max_rows else "off (F.linear at every size)"
    logger.info(
        "CPU linear layers: W @ x.T %s, one row padded to two: %s (time against F.linear at %s)",
        chosen, "yes" if pad_one_row else "no", ratios,
    )
    return max_rows, pad_one_row
