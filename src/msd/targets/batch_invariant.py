"""Batch-invariant bfloat16 kernels for decoding on CPUs with native bfloat16 support (AVX-512 BF16 or AMX).

Terms. A *decoding forward* runs the target over a few new tokens appended to its KV cache: one token in plain
decoding, the n nodes of a draft tree in verification. Kernels are *batch-invariant* when every token of an n-token
forward gets the same bits as it would get in a one-token forward at the same place in the sequence.

Lossless speculative decoding needs that property. PyTorch's CPU kernels pick their blocking and their instruction
path from the number of rows, so a token verified inside a tree is rounded differently from the same token decoded
alone. In float32 the difference stays around 1e-7 and almost never flips a greedy choice. In bfloat16 it does. With
PyTorch's kernels, msd's output on the embedded default target differed from plain decoding on 4 of the 10 benchmark
prompts with a 3-token chain, and on 3 of 10 with an 8-token tree of depth 4. Yet bfloat16 is where a CPU with AMX makes
verification cheap, because a weight read once serves 16 rows at about the cost of one.

Two replacements make every decoding forward of at most `ROWS` tokens batch-invariant:

- `InvariantLinear`: the weight is reordered once into oneDNN's blocked layout. Rows do not interact in a matrix
  product, so a row's result can depend on the other rows only through the kernel oneDNN picks for the row count.
  At load, `skip_padding_where_exact` multiplies random rows by each weight shape in every count from 1 to `ROWS`.
  Shapes that give every row the bits it gets alone run unpadded. The others zero-pad an input of fewer rows to
  exactly `ROWS` rows, so every decoding forward runs one kernel on one shape. On the Xeon below no shape needed
  padding under an earlier, weaker version of the check, and unpadded one-token forwards cost about a tenth less. On a
  Zen 4 CPU the MLP's down projection (1,536 inputs) needed it. Longer inputs (prompts) run unpadded: plain decoding,
  speculative decoding and transformers' `generate` all prefill the same way.
- `invariant_attention` (registered with transformers as `ATTENTION_NAME`): each query row gets its own batch entry
  with one query. Its keys are gathered in cache order (the cached prefix, then its tree ancestors and itself) and
  padded to a multiple of `KEY_BLOCK` keys that the mask hides. A tree node therefore attends over the key layout it
  would have as the last token of plain decoding, and the hidden keys add exact zeros. The layout is built once per
  forward (`key_layout`) and shared by all layers. The query heads that share a key-value head form that head's query
  rows, so one SDPA call covers all heads of all rows. PyTorch's attention kernel multiplies through MKL, which must
  run in strict reproducible mode (`enable_strict_mkl`): otherwise a row's result can depend on the thread computing
  it.

Forwards of more than `ROWS` tokens after the prompt would not be invariant, so `SpeculativeGenerator` rejects trees
above `ROWS` nodes on a target using these kernels. The reordered weights are a second copy next to the originals,
which stay for the state dict, tied embeddings and the draft's borrowed LM head.

Cost of one forward of the embedded default target over n tokens, in median milliseconds, measured by
`benchmarks/default_model/verify_cost.py` on a 2-core Xeon with AMX (Emerald Rapids). The cache held a 103-token prompt
plus 48 generated tokens. float32 runs PyTorch's kernels, bfloat16 these, unpadded:

    tokens per forward     1     3     8    12    16
    float32               38    43    65    74    80
    bfloat16, invariant   36    38    40    45    49
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from msd.errors import MSDError

if TYPE_CHECKING:
    from msd.targets.base import TargetAdapter

logger = logging.getLogger(__name__)

#: rows every decoding forward is padded to; the largest draft tree a target using these kernels can verify
ROWS = 16
#: attention key counts are padded to a multiple of this
KEY_BLOCK = 32
#: the attention implementation name registered with transformers
ATTENTION_NAME = "msd_batch_invariant"


def supported(device: torch.device | str = "cpu") -> bool:
    """True on a CPU where oneDNN runs bfloat16 matrix products: natively with AVX-512 BF16 or AMX, emulated on other
    AVX-512 CPUs (slower than float32 there)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class InvariantLinear(nn.Module):
    """A bfloat16 linear layer whose result for each row does not depend on the other rows of a decoding forward.

    Keeps the wrapped layer's `weight` and `bias` parameters (same state-dict names, ties kept) and a reordered copy
    of the weight for oneDNN. The copy is made once: change the weights afterwards and the layer goes stale.
    """

    def __init__(self, linear: nn.Linear, rows: int = ROWS, pad: bool = True):
        """pad: zero-pad inputs of fewer than `rows` rows to `rows` rows (see `rows_independent`)."""
        super().__init__()
        if linear.weight.dtype != torch.bfloat16:
            raise MSDError(f"batch-invariant linear layers need bfloat16 weights, got {linear.weight.dtype}.")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.rows = rows
        self.pad = pad
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rows: int = ROWS, pad: bool = True) -> InvariantLinear:
        """Wrap a bare (out, in) weight without bias, such as rows taken from an LM head."""
        linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return cls(linear, rows, pad)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1, self.in_features)  # (M, in)
        count = flat.shape[0]
        if self.pad and 0 < count < self.rows:
            flat = F.pad(flat, (0, 0, 0, self.rows - count))  # (ROWS, in), zero rows appended
        return self.product(flat)[:count].reshape(*input.shape[:-1], self.out_features)

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        """Multiply by the reordered weight without padding: (M, in) -> (M, out)."""
        return torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}, pad={self.pad}"
        )


#: random inputs per weight shape in `rows_independent`, at least; layers with few outputs get more
CHECK_TRIALS = 4
#: output values per row count that `rows_independent` compares, at least, over all its trials
CHECK_VALUES = 2048


def random_rows(count: int, features: int, generator: torch.Generator) -> torch.Tensor:
    """Random float32 rows whose entries span several binades, so that sums cancel and a changed summation order
    shows through the final bfloat16 rounding more often than with plain Gaussian inputs."""
    scale = torch.exp2(torch.randint(-6, 7, (count, features), generator=generator).float())
    return torch.randn(count, features, generator=generator) * scale


def rows_independent(layer: InvariantLinear, padded: bool = False) -> bool:
    """Check whether each row of a product of 1 to `layer.rows` rows gets the bits it gets alone.

    This is the property a tree node needs: it is row i of an n-row forward, and the same token in plain decoding is
    a one-row forward. padded: check the padded path instead, where every product has `layer.rows` rows and a token
    alone sits in row 0. oneDNN picks its kernel from the shapes, not the values. But a changed summation order
    changes a bfloat16 result only when it crosses a rounding boundary. So the check compares every row over at least
    `CHECK_TRIALS` random inputs, enough for `CHECK_VALUES` outputs per row count. On a Zen 4 CPU (AVX-512 BF16, no
    AMX), with 1,536 input features, oneDNN's one-row product rounded differently from its products of 2 to 16 rows,
    which agreed with each other. A single Gaussian input, as an earlier version of this check used, passed that shape
    for 4 of 5 random weights.

    NOTE: the check is statistical. A kernel that changes a row's rounding only for rare inputs can pass it.
    """
    generator = torch.Generator().manual_seed(0)
    trials = max(CHECK_TRIALS, -(-CHECK_VALUES // layer.out_features))

    def product(rows: torch.Tensor) -> torch.Tensor:
        if padded:
            rows = F.pad(rows, (0, 0, 0, layer.rows - rows.shape[0]))
        return layer.product(rows)

    for _ in range(trials):
        inputs = random_rows(layer.rows, layer.in_features, generator).to(layer.weight.dtype)
        alone = torch.cat([product(inputs[row : row + 1])[:1] for row in range(layer.rows)])  # (rows, out)
        for count in range(2, layer.rows + 1):
            if not torch.equal(product(inputs[:count])[:count], alone[:count]):
                return False
    return True


def skip_padding_where_exact(layers: list[InvariantLinear]) -> int:
    """Turn padding off for the layers whose weight shape passes `rows_independent`, and return how many changed.

    One layer per weight shape is checked. Padding costs a one-token forward the work of `ROWS` rows, about a tenth
    of a plain decoding step on the embedded default target (2-core Xeon with AMX), where no shape needed it. A shape
    that is not exact even padded raises `MSDError`: this CPU's bfloat16 kernels cannot verify trees losslessly.
    """
    verdicts: dict[tuple[int, int, bool], bool] = {}
    turned_off = 0
    for layer in layers:
        shape = (layer.out_features, layer.in_features, layer.bias is not None)
        if shape not in verdicts:
            verdicts[shape] = rows_independent(layer)
            if not verdicts[shape] and not rows_independent(layer, padded=True):
                raise MSDError(
                    f"this CPU's bfloat16 matrix kernels round a row differently depending on the other rows for "
                    f"weight shape {layer.out_features}x{layer.in_features}, even padded to {layer.rows} rows, so "
                    "trees cannot be verified exactly. Load the target in float32 (--dtype float32)."
                )
        if verdicts[shape]:
            layer.pad = False
            turned_off += 1
    padded = sorted(f"{rows}x{columns}" for (rows, columns, _), exact in verdicts.items() if not exact)
    if padded:
        logger.debug("padding decoding forwards to %d rows for weight shapes %s", ROWS, ", ".join(padded))
    return turned_off


#: MKL's conditional numerical reproducibility codes (mkl_cbwr_get and mkl_cbwr_set in MKL's service functions)
MKL_CBWR_AUTO = 2
MKL_CBWR_STRICT = 0x10000
MKL_CBWR_ALL = -1
MKL_CBWR_SUCCESS = 0
#: the MKL_CBWR environment value that selects strict reproducible mode
STRICT_MKL_SETTING = "AUTO,STRICT"


def request_strict_mkl() -> None:
    """Ask for MKL's strict reproducible mode in the environment, unless MKL_CBWR is already set.

    MKL reads the variable at its first call, so this works any time before the first PyTorch product, and child
    processes inherit it. Loading a bfloat16 target switches MKL itself when MKL has not run yet
    (`enable_strict_mkl`), so this call matters in processes that multiply in float32 first.
    """
    os.environ.setdefault("MKL_CBWR", STRICT_MKL_SETTING)


def mkl_mode_functions() -> tuple | None:
    """Return MKL's functions that read and set its reproducibility mode, or None where they cannot be found.

    PyTorch links MKL into libtorch_cpu and exports its service functions under their internal names
    (`mkl_serv_cbwr_get` and `mkl_serv_cbwr_set`, both int(int)), checked on Linux builds of torch 2.13.
    """
    try:
        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        functions = library.mkl_serv_cbwr_get, library.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return None
    for function in functions:
        function.argtypes = [ctypes.c_int]
        function.restype = ctypes.c_int
    return functions


def enable_strict_mkl() -> bool | None:
    """Switch the MKL inside PyTorch to strict reproducible mode where possible, and return whether it runs so.

    PyTorch's CPU attention kernel multiplies through MKL from a scratch buffer per thread. Outside strict mode MKL
    may round differently by the buffer's memory alignment, so a tree node and the same token in plain decoding,
    computed on different threads, can differ in one element (seen on Zen 4 with AVX-512 BF16). MKL takes the mode
    only before its first call: from the environment (MKL_CBWR=AUTO,STRICT) or from this function. A mode set
    in the environment without STRICT is replaced while MKL has not run. Returns None when this PyTorch has no MKL,
    or when msd cannot reach MKL's mode functions and the environment does not ask for strict mode (with a warning).
    """
    if not torch.backends.mkl.is_available():
        return None
    functions = mkl_mode_functions()
    if functions is None:
        if "STRICT" in os.environ.get("MKL_CBWR", "").upper():
            return True
        logger.warning(
            "cannot check MKL's reproducibility mode in this PyTorch build; set MKL_CBWR=AUTO,STRICT before "
            "starting Python, or bfloat16 trees may not match plain decoding bit for bit"
        )
        return None
    get, set_mode = functions
    mode = get(MKL_CBWR_ALL)
    if mode >= 0 and mode & MKL_CBWR_STRICT:
        return True
    return set_mode(MKL_CBWR_AUTO | MKL_CBWR_STRICT) == MKL_CBWR_SUCCESS


@dataclass
class KeyLayout:
    """The keys each query row of a decoding forward attends to, in the padded per-row layout.

    q is the number of new tokens, W the padded key count (a multiple of `KEY_BLOCK`).
    """

    index: torch.Tensor  # (q * W,) cache index of each row's keys: the prefix, its visible new tokens, then key 0
    mask: torch.Tensor  # (q, 1, 1, W) additive: 0 on the row's keys, the dtype's minimum on the padding
    width: int  # W


def key_layout(visible: torch.Tensor, prefix: int, dtype: torch.dtype) -> KeyLayout:
    """Build the layout of a forward over q new tokens appended to `prefix` cached ones.

    visible: (q, q) bool, [i, j] True when new token i attends to new token j (its ancestors and itself).
    """
    count = visible.shape[0]
    device = visible.device
    seen = visible.sum(-1)  # (q,) new tokens each row attends to
    longest = int(seen.max())
    width = -(-(prefix + longest) // KEY_BLOCK) * KEY_BLOCK
    # Each row's visible new tokens in cache order: a stable sort puts them first.
    order = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices[:, :longest]  # (q, longest)
    index = torch.zeros(count, width, dtype=torch.long, device=device)
    index[:, :prefix] = torch.arange(prefix, device=device)
    index[:, prefix : prefix + longest] = prefix + order
    padding = torch.arange(width, device=device)[None] >= (prefix + seen)[:, None]  # (q, W)
    index.masked_fill_(padding, 0)
    mask = torch.zeros(count, 1, 1, width, dtype=dtype, device=device)
    mask.masked_fill_(padding[:, None, None], torch.finfo(dtype).min)
    return KeyLayout(index=index.reshape(-1), mask=mask, width=width)


@functools.lru_cache(maxsize=8)
def causal_layout(count: int, prefix: int, dtype: torch.dtype) -> KeyLayout:
    """Return the layout of `count` new tokens that each attend to the ones before them. It is cached because
    transformers' `generate` passes no mask to one-token forwards, and every layer of a forward needs the layout."""
    return key_layout(torch.ones(count, count, dtype=torch.bool).tril(), prefix, dtype)


def layout_from_mask(
    attention_mask: torch.Tensor | None, count: int, kv: int, dtype: torch.dtype
) -> KeyLayout | None:
    """Read the layout from a transformers attention mask; None when the mask hides part of the cached prefix."""
    prefix = kv - count
    if attention_mask is None:
        return causal_layout(count, prefix, dtype)
    allowed = attention_mask[0, 0] if attention_mask.dtype == torch.bool else attention_mask[0, 0] == 0
    allowed = allowed.expand(count, kv)
    if not bool(allowed[:, :prefix].all()):
        return None
    return key_layout(allowed[:, prefix:], prefix, dtype)


def invariant_attention(module, query, key, value, attention_mask, key_layout: KeyLayout | None = None, **kwargs):
    """Scaled dot-product attention, one batch entry per query row (see the module docstring).

    query: (1, heads, q, D); key, value: (1, kv heads, kv, D), the last q of them the new tokens;
    attention_mask: None (causal), bool (True = attend) or additive, broadcastable to (1, 1, q, kv).
    key_layout: the forward's `KeyLayout`, built once for all layers by `TargetAdapter.forward_tree`; without it the
    layout is read from the mask. Returns (1, q, heads, D) as transformers' attention functions do. Prompts
    (q > ROWS), batches and masks that hide part of the cached prefix go to transformers' own SDPA function.
    """
    batch, heads, count, dim = query.shape
    kv_heads = key.shape[1]
    if kwargs.get("sliding_window") is not None:
        raise MSDError("msd's batch-invariant attention does not support sliding-window attention.")
    if batch != 1 or count > ROWS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layout = key_layout or layout_from_mask(attention_mask, count, key.shape[2], query.dtype)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    # NOTE: every row copies all cached keys and values, so a q-row forward costs q times one row's attention. With
    # thousands of cached tokens this outgrows the linear layers and msd falls behind plain decoding (README, Limits).
    def gather(states: torch.Tensor) -> torch.Tensor:
        """(1, kv heads, kv, D) -> (q, kv heads, W, D), each row's keys in the layout's order."""
        by_position = states[0].transpose(0, 1).contiguous()  # (kv, kv heads, D): one index per key position
        rows = by_position.index_select(0, layout.index)  # (q * W, kv heads, D)
        return rows.view(count, layout.width, kv_heads, dim).transpose(1, 2)

    # A row's query heads that share a key-value head become that head's query rows (grouped-query attention).
    queries = query[0].transpose(0, 1).reshape(count, kv_heads, heads // kv_heads, dim)  # (q, kv heads, G, D)
    output = F.scaled_dot_product_attention(
        queries, gather(key), gather(value), attn_mask=layout.mask, scale=kwargs.get("scaling")
    )  # (q, kv heads, G, D)
    return output.reshape(1, count, heads, dim), None


AttentionInterface.register(ATTENTION_NAME, invariant_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def pack_linear_layers(module: nn.Module, pad: bool = True) -> list[InvariantLinear]:
    """Replace every `nn.Linear` inside `module` by an `InvariantLinear`, in place, and return the new layers."""
    replacements = invariant_replacements(module, pad)
    for parent, name, layer in replacements:
        setattr(parent, name, layer)
    return [layer for _, _, layer in replacements]


def invariant_replacements(module: nn.Module, pad: bool = True) -> list[tuple[nn.Module, str, InvariantLinear]]:
    """Return (parent, attribute name, `InvariantLinear`) for every `nn.Linear` inside `module`, replacing none."""
    return [
        (parent, name, InvariantLinear(child, pad=pad))
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


def use_batch_invariant_kernels(target: "TargetAdapter") -> int:
    """Switch a bfloat16 target's language model and LM head to the batch-invariant kernels, in place.

    Sets `target.max_tree_tokens` to `ROWS` and returns the number of linear layers replaced. The vision tower and
    projector keep their layers: they run once per prompt.
    """
    model = target.model
    if not supported(target.device):
        raise MSDError(
            "batch-invariant bfloat16 kernels need a CPU where oneDNN runs bfloat16 products (AVX-512, AVX-512 BF16 "
            "or AMX). Load the target in float32 instead (--dtype float32)."
        )
    if enable_strict_mkl() is False:
        raise MSDError(
            "batch-invariant bfloat16 kernels need MKL's strict reproducible mode, and MKL already ran in another "
            "mode in this process. Start Python with MKL_CBWR=AUTO,STRICT in the environment, or load the target "
            "before any other PyTorch computation (the msd command sets MKL_CBWR itself)."
        )
    replacements = invariant_replacements(target.language_model)
    layers = [layer for _, _, layer in replacements]
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        layers.append(InvariantLinear(head))
    unpadded = skip_padding_where_exact(layers)  # raises before the model changes when a shape cannot be exact
    for parent, name, layer in replacements:
        setattr(parent, name, layer)
    if type(head) is nn.Linear:
        model.set_output_embeddings(layers[-1])
    model.set_attn_implementation({"text_config": ATTENTION_NAME})
    target.max_tree_tokens = ROWS
    logger.info(
        "batch-invariant bfloat16 kernels: %d linear layers (%d unpadded), attention %s",
        len(layers), unpadded, ATTENTION_NAME,
    )
    return len(layers)
