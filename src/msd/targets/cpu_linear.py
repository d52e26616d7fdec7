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

So the choice is measured on the machine at load time: `choose_max_rows` times both products over the model's own
weights (`load_target(cpu_linear_rows="auto")`, the default).

`SmallBatchLinear` takes the second form for inputs of at most `max_rows` rows and `F.linear` otherwise. Both compute
the same product, but in a different summation order, so results can differ in the last bits. Plain decoding and
tree verification use the same layers, and transformers' `generate` on the same model object does too, so outputs
stay identical to decoding with the model as loaded.
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
#: row limits `choose_max_rows` can pick (on the Zen 3 CPU, F.linear was faster again at 12 rows)
CANDIDATE_ROWS = (2, 4, 8)
DEFAULT_MAX_ROWS = 8
#: the transposed product must take at most this share of F.linear's time to be used
REQUIRED_RATIO = 0.9
#: weight matrices timed per pass, enough that they do not all fit in the CPU's caches
TIMED_WEIGHTS = 32


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


def time_products(
    module: nn.Module, rows: Sequence[int] = CANDIDATE_ROWS, repeats: int = 5
) -> dict[int, tuple[float, float]]:
    """Time `F.linear` and `(W @ x.T).T` over the module's weights, per row count: {rows: (linear s, transposed s)}.

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
                run_pass(inputs, transposed)
                results.append(statistics.median(run_pass(inputs, transposed) for _ in range(repeats)))
            times[count] = (results[0], results[1])
    return times


def pick_max_rows(times: Mapping[int, tuple[float, float]]) -> int:
    """Return the largest row count up to which the transposed product beat F.linear at every timed count.

    The transposed product wins at a row count when it took at most `REQUIRED_RATIO` of F.linear's time. Returns 0,
    which keeps PyTorch's layers, when it did not win at the smallest count.
    """
    chosen = 0
    for count in sorted(times):
        linear, transposed = times[count]
        if transposed > REQUIRED_RATIO * linear:
            break
        chosen = count
    return chosen


def choose_max_rows(module: nn.Module) -> int:
    """Measure the row limit for `use_small_batch_linears` on this machine (see `time_products`)."""
    times = time_products(module)
    chosen = pick_max_rows(times)
    ratios = ", ".join(f"{count} rows: {transposed / linear:.2f}" for count, (linear, transposed) in times.items())
    if chosen:
        logger.info(
            "CPU linear layers: W @ x.T for inputs of at most %d rows (time against F.linear at %s)", chosen, ratios
        )
    else:
        logger.info("CPU linear layers: keeping F.linear, W @ x.T was not faster (time against F.linear at %s)", ratios)
    return chosen
