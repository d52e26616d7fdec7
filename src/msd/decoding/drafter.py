"""Drafters: what proposes the tree each cycle.

A drafter follows one sequence through three calls from the generation loop:

- `start(prefill, state, first_token)` after the target's prefill, with the first generated token;
- `propose(root_token, params, max_depth)` for the tree of the next cycle;
- `update(new_tokens, accepted_hidden)` after verification, with the emitted tokens (accepted plus bonus) and the
  target's features at the root and the accepted nodes.

`RootOnlyDrafter` proposes no candidates, which turns the speculative loop into plain decoding through the same
target calls. `MSDDrafter` runs the MSD draft model and grows an EAGLE-2 dynamic tree over the sequence's
`DraftVocabulary` (a reduced draft vocabulary plus the prompt's other tokens), then grafts on the continuation of the
sequence's last n-gram where it occurred before (`msd.decoding.lookup`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from msd.decoding.lookup import NgramIndex
from msd.decoding.tree import DraftTree, TreeParams, graft_chain, select_nodes
from msd.decoding.vocabulary import DraftVocabulary
from msd.draft.model import DraftModel, causal_mask
from msd.draft.runner import DraftRunner
from msd.targets import batch_invariant
from msd.targets.base import PrefillOutput, TargetAdapter, TargetState
from msd.targets.cpu_linear import SmallBatchLinear


class Drafter(ABC):
    """Proposes draft trees for one sequence (see the module docstring)."""

    def start(self, prefill: PrefillOutput, state: TargetState, first_token: int) -> None:
        """Begin a sequence after the target's prefill."""

    @abstractmethod
    def propose(self, root_token: int, params: TreeParams, max_depth: int) -> DraftTree:
        """Draft a tree rooted at `root_token` (the last emitted token), at most `max_depth` deep."""

    def update(self, new_tokens: torch.Tensor, accepted_hidden: torch.Tensor) -> None:
        """Take the cycle's outcome: new_tokens (k + 1,) accepted then bonus; accepted_hidden (k + 1, H)."""


class RootOnlyDrafter(Drafter):
    """No draft: every cycle verifies the root alone, which is plain autoregressive decoding."""

    def propose(self, root_token: int, params: TreeParams, max_depth: int) -> DraftTree:
        return DraftTree.chain([root_token])


class MSDDrafter(Drafter):
    """Grows an EAGLE-2 dynamic tree with the MSD draft model, keeping the draft's own KV cache."""

    def __init__(self, draft: DraftModel, target: TargetAdapter, prompt_vocabulary: bool = True):
        """prompt_vocabulary: let a draft with a reduced vocabulary also propose the prompt's other tokens."""
        weight = draft.fc.weight
        copied = weight.dtype != target.dtype or weight.device != target.device
        if copied:
            draft = draft.clone()  # attach() casts in place: the caller's draft keeps its weights for other targets
        draft = draft.attach(target).eval()
        if target.dtype == torch.bfloat16 and batch_invariant.supported(target.device):
            draft = draft.pack() if copied else draft.packed_copy()
        elif isinstance(target.lm_head, SmallBatchLinear):  # the target's measured choice suits the draft's products
            draft = (draft if copied else draft.clone()).use_small_batch(
                target.lm_head.max_rows, target.lm_head.pad_one_row
            )
        self.draft = draft
        self.target = target
        self.prompt_vocabulary = prompt_vocabulary
        self.vocabulary = DraftVocabulary(draft)
        self.runner = DraftRunner(draft)  # the draft's forward and its key-value cache
        self.cache_length = 0  # draft slots whose keys and values are kept across cycles
        self.next_position = 0  # target position id of the token after the root
        self.root_feature: torch.Tensor | None = None  # (H,) draft output at the root's slot
        self.root_logprobs: torch.Tensor | None = None  # (V_draft,) draft log-probs of the root's children
        self.ngrams = NgramIndex()  # the prompt's text tokens and the emitted ones
        self.grafts = 0  # cycles of this sequence whose tree received grafted tokens

    @torch.no_grad()
    def start(self, prefill: PrefillOutput, state: TargetState, first_token: int) -> None:
        device = self.target.device
        # Slot j pairs the target feature h_j with token x_{j+1} and takes x_{j+1}'s position (see msd.draft.model).
        first = torch.tensor([first_token], device=device)
        next_tokens = torch.cat([prefill.input_ids[1:], first])  # (L,)
        next_visual = torch.cat([prefill.visual_mask[1:], torch.zeros(1, dtype=torch.bool, device=device)])
        next_embeds = torch.cat([prefill.inputs_embeds[1:], prefill.inputs_embeds[-1:]])  # last row unused: text
        next_positions = torch.cat(
            [prefill.positions[:, 1:], self.target.generated_positions(state, 1)[: prefill.positions.shape[0]]], dim=1
        )
        if self.prompt_vocabulary:
            tokenizer = getattr(self.target.processor, "tokenizer", self.target.processor)
            self.vocabulary = DraftVocabulary.for_prompt(
                self.draft,
                self.target.lm_head.weight,
                prefill.input_ids[~prefill.visual_mask],
                skip_ids=getattr(tokenizer, "all_special_ids", None) or (),
            )
        self.ngrams = NgramIndex()
        self.ngrams.extend(prefill.input_ids[~prefill.visual_mask].tolist() + [first_token])
        self.grafts = 0
        self.runner.reset()
        self.cache_length = 0
        self.next_position = state.next_position + 1
        self._extend(next_tokens, prefill.hidden_states, next_positions, next_visual, next_embeds)

    @torch.no_grad()
    def update(self, new_tokens: torch.Tensor, accepted_hidden: torch.Tensor) -> None:
        count = new_tokens.shape[0]
        self.runner.truncate(self.cache_length)  # drop the tree slots drafted this cycle
        positions = self._positions(torch.arange(count, device=self.target.device))
        self._extend(new_tokens.to(self.target.device), accepted_hidden, positions)
        self.next_position += count
        self.ngrams.extend(new_tokens.tolist())

    def _positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """(P, n) position ids `next_position + offsets` in the draft's position rows."""
        positions = self.next_position + offsets
        return positions.view(1, -1).expand(self.draft.position_rows, -1)

    def _extend(self, tokens, features, positions, visual_mask=None, visual_embeds=None) -> None:
        """Append slots to the draft cache; the last slot's output becomes the next root's."""
        count = tokens.shape[0]
        mask = causal_mask(count, self.draft.fc.weight.dtype, tokens.device, cached=self.cache_length)
        hidden = self.runner.extend(tokens, features, positions, mask, visual_embeds, visual_mask)
        self.cache_length += count
        self.root_feature = hidden[-1]
        self.root_logprobs = torch.log_softmax(self.vocabulary.logits(hidden[-1]).float(), dim=-1)

    @torch.no_grad()
    def propose(self, root_token: int, params: TreeParams, max_depth: int) -> DraftTree:
        tree = self._draft_tree(root_token, params, max_depth)
        budget = params.lookup_tokens
        if self.target.max_tree_tokens is not None:  # the largest tree this target verifies exactly
            budget = min(budget, self.target.max_tree_tokens - len(tree))
        if budget < 1:
            return tree
        # The chain may first follow a path of the draft's tree, so ask for that path's length on top of the budget.
        chain = self.ngrams.continuation(int(tree.depths.max()) + budget)
        grafted = graft_chain(tree, chain, budget, max_depth)
        self.grafts += grafted is not tree
        return grafted

    def _draft_tree(self, root_token: int, params: TreeParams, max_depth: int) -> DraftTree:
        """Grow the draft model's tree of at most `params.total_tokens` nodes (see the module docstring)."""
        depth = min(params.depth, max_depth, params.total_tokens - 1)  # no path is longer than the tree's size
        if depth < 1 or params.total_tokens < 2:
            return DraftTree.chain([root_token])
        # A tree of N nodes keeps at most N - 1 candidates. A candidate ranked below N - 1 others (its siblings, or
        # the other nodes of its step) is never kept, and neither are its descendants, so a larger top-k only costs
        # time.
        top_k = min(params.top_k, self.root_logprobs.shape[0], params.total_tokens - 1)

        # Candidates are stored parents-first: token (draft-vocabulary id), parent (-1 = root), cumulative log-prob.
        # Parents stay a host list, so the loops over them run without reading tensors.
        frontier_scores, frontier_tokens = self.root_logprobs.topk(top_k)  # (k,) each
        cand_tokens, cand_scores = [frontier_tokens], [frontier_scores]
        parent_of = [-1] * top_k
        frontier = list(range(top_k))  # candidate indices of the nodes expanded next
        frontier_features = self.root_feature.expand(top_k, -1)  # (k, H) feature of each frontier node's parent
        fed_slot: dict[int, int] = {}  # candidate index -> draft cache slot, for the tree attention mask

        for step in range(1, depth):
            hidden = self._feed_frontier(frontier, frontier_tokens, frontier_features, parent_of, fed_slot, step)
            logprobs = torch.log_softmax(self.vocabulary.logits(hidden).float(), dim=-1)  # (k, V_draft)
            child_scores, child_tokens = logprobs.topk(top_k, dim=-1)  # (k, k)
            child_scores = (child_scores + frontier_scores[:, None]).view(-1)  # cumulative log-probability
            child_tokens = child_tokens.view(-1)
            first = len(parent_of)
            parent_of += [node for node in frontier for _ in range(top_k)]
            cand_tokens.append(child_tokens)
            cand_scores.append(child_scores)

            frontier_scores, best = child_scores.topk(top_k)  # next frontier among the new children
            frontier = [first + index for index in best.tolist()]
            frontier_tokens = child_tokens[best]
            frontier_features = hidden[best // top_k]

        chosen = select_nodes(torch.cat(cand_scores).cpu(), torch.tensor(parent_of), params.total_tokens - 1)
        order = depth_first(chosen.tolist(), parent_of)
        # Renumber: the root becomes node 0 and candidate order[i] becomes node i + 1.
        node_of = {candidate: node for node, candidate in enumerate(order, start=1)}
        parents = [-1] + [node_of.get(parent_of[candidate], 0) for candidate in order]
        tokens = self.vocabulary.to_target_ids(torch.cat(cand_tokens)[torch.tensor(order, device=self.target.device)])
        return DraftTree(
            tokens=torch.cat([torch.tensor([root_token]), tokens.cpu()]),
            parents=torch.tensor(parents),
        )

    def _feed_frontier(self, frontier, tokens, features, parent_of, fed_slot, step) -> torch.Tensor:
        """Run the draft on the frontier nodes; each attends to the kept slots, its fed ancestors and itself."""
        k = len(frontier)
        device = tokens.device
        first_slot = self.runner.length
        dtype = self.draft.fc.weight.dtype
        mask = torch.full((k, first_slot + k), torch.finfo(dtype).min, dtype=dtype)  # built on the host, moved once
        mask[:, : self.cache_length] = 0
        for row, node in enumerate(frontier):
            visible = [first_slot + row]
            ancestor = parent_of[node]
            while ancestor >= 0:
                visible.append(fed_slot[ancestor])
                ancestor = parent_of[ancestor]
            mask[row, visible] = 0
            fed_slot[node] = first_slot + row
        mask = mask.to(device)
        # Frontier nodes are at depth `step`, and `next_position` is the position of depth 1.
        positions = self._positions(torch.full((k,), step - 1, device=device))
        token_ids = self.vocabulary.to_target_ids(tokens)
        return self.runner.extend(token_ids, features, positions, mask)


def depth_first(candidates: list[int], parent_of: list[int]) -> list[int]:
    """Order tree candidates depth first, each node's children in the order they were listed.

    candidates: indices into `parent_of` (-1 = child of the root), closed under parents and sorted. The draft lists
    each node's children best first, so the chain of best children becomes nodes 1, 2, 3, ... When the target
    accepts that path, its cache entries are already in place and `TargetAdapter.keep_accepted` moves nothing.
    """
    children: dict[int, list[int]] = {-1: []}
    for candidate in candidates:
        children[candidate] = []
        children[parent_of[candidate]].append(candidate)
    order: list[int] = []
    stack = children[-1][::-1]
    while stack:
        node = stack.pop()
        order.append(node)
        stack += children[node][::-1]
    return order
