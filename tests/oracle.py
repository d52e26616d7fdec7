"""A test drafter that is given the target's greedy continuation in advance."""

from __future__ import annotations

import torch

from msd.decoding.drafter import Drafter
from msd.decoding.tree import DraftTree, TreeParams


class OracleDrafter(Drafter):
    """Proposes the true continuation as a chain, with `decoys` wrong siblings beside each true node.

    With no decoys every proposed token is accepted under greedy decoding, so tau reaches depth + 1.
    """

    def __init__(self, continuation: list[int], vocab_size: int, decoys: int = 0):
        self.continuation = continuation
        self.vocab_size = vocab_size
        self.decoys = decoys
        self.emitted = 0

    def start(self, prefill, state, first_token: int) -> None:
        self.emitted = 1

    def update(self, new_tokens: torch.Tensor, accepted_hidden: torch.Tensor) -> None:
        self.emitted += new_tokens.shape[0]

    def propose(self, root_token: int, params: TreeParams, max_depth: int) -> DraftTree:
        depth = min(params.depth, max_depth)
        chain = self.continuation[self.emitted : self.emitted + depth]
        tokens, parents = [root_token], [-1]
        true_node = 0
        for token in chain:
            parent = true_node
            true_node = len(tokens)
            tokens.append(token)
            parents.append(parent)
            for offset in range(1, self.decoys + 1):
                tokens.append((token + offset) % self.vocab_size)
                parents.append(parent)
        tokens, parents = tokens[: params.total_tokens], parents[: params.total_tokens]
        return DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents))
