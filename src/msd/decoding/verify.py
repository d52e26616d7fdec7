"""Verification: which draft tokens the target accepts, and the token it adds.

Terms used throughout msd:

- accepted tokens: the draft tokens on the path the target agrees with, read from the root down;
- bonus token: the token the target chooses after the last accepted node. It is emitted every cycle, so a cycle
  with k accepted tokens emits k + 1 tokens for one target forward;
- tau: tokens emitted per target forward during decoding, bonus included (plain decoding has tau = 1).

The rule, for greedy decoding and sampling alike, walks the tree from the root. At the current node, the target's
next token x is drawn from its own distribution p at that node (argmax under greedy decoding). If x is the token of a
child, the walk moves to that child and x is accepted. Otherwise x is the bonus token and the cycle ends.

Why this is exact: every emitted token is drawn from the target's own distribution given exactly the tokens before
it, because a node's logits come from a forward over the prompt and that node's ancestors. The tree only decides how
many of those draws one forward can serve.

The rule is equivalent to multi-candidate rejection sampling with candidates chosen deterministically (the draft's
top-k and the n-gram lookup's continuation, both fixed by the tokens before them). That scheme tries children c1, c2, ... in order and accepts ci with probability p(ci), where p is
renormalised after removing the rejected children. If all are rejected, it samples from what is left. It emits each
token t with probability p(t), which is what drawing x from p and matching it against the children does in one step.
No draft probability enters the rule, so a draft that samples its candidates would need the general rule instead.

Temperature, top-k and top-p only change p. They are applied with transformers' own logits warpers in the order its
`generate` uses (temperature, then top-k, then top-p), so "the target's distribution" means the same thing here as
in `model.generate(do_sample=True, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from msd.decoding.tree import DraftTree


@dataclass(frozen=True)
class SamplingParams:
    """Token-choice settings of the target. `do_sample=False` is greedy decoding (argmax)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0  # 1.0 disables nucleus filtering

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")


class TokenChooser:
    """Chooses the target's token from logits, greedily or by sampling from the warped distribution."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None = None):
        self.params = params
        self.generator = generator
        warpers = LogitsProcessorList()
        if params.do_sample:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                warpers.append(TopKLogitsWarper(top_k=params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=params.top_p))
        self.warpers = warpers

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Compute the target's distribution p for each row of logits (n, V), after the warpers."""
        warped = self.warpers(None, logits.float())
        return torch.softmax(warped, dim=-1)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Choose one token per row of logits: (n, V) -> (n,)."""
        if not self.params.do_sample:
            return greedy_choice(logits)
        probs = self.probabilities(logits)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).view(-1)


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """Return the argmax of each row of logits (n, V) -> (n,), the first index among equal maxima.

    `torch.max` over a dimension returns the same indices as `argmax` (the first maximum, as transformers' greedy
    decoding takes) and is about three times faster on CPU for a tree's worth of rows.
    """
    return logits.max(dim=-1).indices


def walk_tree(tree: DraftTree, logits: torch.Tensor, chooser: TokenChooser) -> tuple[list[int], int]:
    """Walk the tree along the target's choices (see the module docstring).

    logits: (n, V) target logits at each tree node, in the target's dtype. Only the rows on the walk are read, each
    converted to float32 first, as transformers' `generate` converts its logits. Returns the accepted path as node
    indices (root first, so its length is the number of accepted tokens plus one) and the bonus token.
    """
    children = tree.children()
    node = 0
    path = [0]
    while True:
        token = int(chooser.choose(logits[node : node + 1].float())[0])
        if token not in children[node]:
            return path, token
        node = children[node][token]
        path.append(node)
