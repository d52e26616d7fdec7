"""Draft trees: the candidate continuations a drafter proposes and the target verifies in one forward.

Node 0 is the root: the last token already emitted, which is not yet in the target's cache. Every other node is a
candidate token whose parent is the token before it. Nodes are stored parents-first (a parent's index is smaller than
its children's), so a path is read by following `parents` from any node to the root.

`select_nodes` implements EAGLE-2's dynamic tree: candidates are scored by the cumulative log-probability the draft
gives their path, and the best `total_tokens - 1` of them form the tree. A child's score is at most its parent's,
so the selected set always contains each selected node's ancestors. `graft_chain` adds a chain of tokens from
another source (`msd.decoding.lookup`) to a tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class TreeParams:
    """Shape of the draft tree.

    depth: draft steps per cycle, so the draft's deepest node below the root.
    top_k: children kept per expanded node, and nodes expanded per step.
    total_tokens: maximum nodes the draft proposes, root included.
    lookup_tokens: maximum tokens grafted per cycle from an earlier occurrence of the sequence's last n-gram
        (`msd.decoding.lookup`), beyond total_tokens and depth. 0 turns the lookup off.
    """

    depth: int = 5
    top_k: int = 8
    total_tokens: int = 48
    lookup_tokens: int = 4

    def __post_init__(self):
        for name in ("depth", "top_k", "total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"tree {name} must be at least 1, got {getattr(self, name)}")
        if self.lookup_tokens < 0:
            raise ValueError(f"tree lookup_tokens must be 0 (off) or positive, got {self.lookup_tokens}")

    @classmethod
    def parse(cls, text: str) -> TreeParams:
        """Read "depth,top_k,total_tokens", for example "3,1,4" for a chain of three drafted tokens."""
        parts = text.split(",")
        if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"invalid tree {text!r}: expected depth,top_k,total_tokens such as 3,1,4")
        depth, top_k, total_tokens = (int(part) for part in parts)
        return cls(depth=depth, top_k=top_k, total_tokens=total_tokens)

    def capped(self, max_tokens: int | None) -> TreeParams:
        """Return these parameters with total_tokens lowered so that the draft's tree and the lookup's tokens fit in
        `max_tokens` (a target's `max_tree_tokens`). The draft keeps at least its root."""
        if max_tokens is None or self.total_tokens + self.lookup_tokens <= max_tokens:
            return self
        return replace(self, total_tokens=max(max_tokens - self.lookup_tokens, 1))


@dataclass
class DraftTree:
    """A tree of n candidate tokens; node 0 is the root."""

    tokens: torch.Tensor  # (n,) token ids
    parents: torch.Tensor  # (n,) parent index, -1 for the root

    def __post_init__(self):
        self._parents = self.parents.tolist()  # host copies: the loops below read them without tensor indexing
        self._tokens = self.tokens.tolist()
        depths = [0] * len(self)
        for node in range(1, len(self)):
            parent = self._parents[node]
            if not 0 <= parent < node:
                raise ValueError(f"tree node {node} has parent {parent}; parents must come before their children")
            depths[node] = depths[parent] + 1
        self.depths = torch.tensor(depths, dtype=torch.long)  # (n,) depth below the root

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def chain(cls, tokens: list[int] | torch.Tensor) -> DraftTree:
        """Build a tree with one path: tokens[0] is the root and each later token the child of the one before."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        return cls(tokens=tokens, parents=torch.arange(-1, tokens.shape[0] - 1))

    def ancestor_mask(self) -> torch.Tensor:
        """(n, n) bool mask: [i, j] is True when node j is node i or one of its ancestors."""
        n = len(self)
        rows = [[False] * n for _ in range(n)]
        for node in range(n):
            if node:
                rows[node] = rows[self._parents[node]].copy()
            rows[node][node] = True
        return torch.tensor(rows, dtype=torch.bool)

    def children(self) -> list[dict[int, int]]:
        """For each node, a map from child token id to child node index."""
        table: list[dict[int, int]] = [{} for _ in range(len(self))]
        for node in range(1, len(self)):
            table[self._parents[node]].setdefault(self._tokens[node], node)
        return table

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        path = []
        while node >= 0:
            path.append(node)
            node = self._parents[node]
        return path[::-1]


def graft_chain(tree: DraftTree, chain: Sequence[int], budget: int, max_depth: int) -> DraftTree:
    """Add `chain`, candidate tokens after the root, to `tree`.

    The chain follows the tree's nodes while their tokens agree. At most `budget` of its remaining tokens become a new
    path below the last agreeing node, none deeper than `max_depth` below the root. Returns `tree` itself when nothing
    is added.
    """
    children = tree.children()
    node = matched = 0
    while matched < len(chain) and chain[matched] in children[node]:
        node = children[node][chain[matched]]
        matched += 1
    room = min(budget, max_depth - int(tree.depths[node]))
    added = list(chain[matched : matched + max(room, 0)])
    if not added:
        return tree
    size = len(tree)
    parents = tree._parents + [node] + list(range(size, size + len(added) - 1))  # a path: each node under the last
    return DraftTree(tokens=torch.tensor(tree._tokens + added), parents=torch.tensor(parents))


def select_nodes(scores: torch.Tensor, parents: torch.Tensor, budget: int) -> torch.Tensor:
    """Choose up to `budget` candidates with the highest scores, closed under ancestors.

    scores: (m,) cumulative log-probabilities; parents: (m,) index of each candidate's parent among the candidates,
    -1 for children of the root. Candidates must be listed parents-first. Returns the chosen indices, sorted, so the
    result is again parents-first.
    """
    if budget >= scores.shape[0]:
        return torch.arange(scores.shape[0])
    # Stable sort on -score: among equal scores the earlier (shallower) candidate wins, so a parent ranks at least as
    # high as its child even when the child's log-probability is exactly 0.
    order = torch.sort(-scores, stable=True).indices[:budget]
    chosen = set(order.tolist())
    for node in order.tolist():  # guard against NaN scores breaking the ordering argument above
        parent = int(parents[node])
        while parent >= 0 and parent not in chosen:
            chosen.add(parent)
            parent = int(parents[parent])
    return torch.tensor(sorted(chosen), dtype=torch.long)
