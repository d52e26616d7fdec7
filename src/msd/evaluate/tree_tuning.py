"""Choosing the draft tree's size for the machine at hand.

A tree of n tokens costs one target forward over n tokens plus `depth` draft steps, and yields tau tokens. On a GPU
the target's forward costs about the same for 1 and for dozens of tokens, so large trees pay off. On a CPU the cost
grows with n almost from the start, so small trees win. `tune_tree`:

1. times the target's forward over trees of each candidate size, with and without the n-gram lookup's tokens
   (`TreeParams.lookup_tokens`, within the target's exact limit), after one prompt's prefill;
2. times the draft's proposal of a tree for each candidate depth;
3. runs a short greedy generation with each (total_tokens, depth) pair to measure tau and the share g of cycles whose
   tree received grafted tokens;
4. picks the pair with the highest estimated throughput

       tau / ((1 - g) * forward(size) + g * forward(size + lookup tokens) + proposal(depth)).

A grafted cycle is charged the whole lookup budget, though the lookup may graft fewer tokens. The estimate uses the
repeated timings of steps 1 and 2 rather than the pilot's own wall time, which is one short run and noisy.

Candidate sizes default to `DEFAULT_SIZES`, suited to GPUs, and to `CAPPED_SIZES` on a target whose batch-invariant
CPU kernels verify at most 16 tokens.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from msd.decoding import MSDDrafter, SpeculativeGenerator, TreeParams
from msd.decoding.tree import DraftTree
from msd.draft import DraftModel
from msd.errors import MSDError
from msd.evaluate.methods import wall_clock
from msd.targets.base import TargetAdapter, truncate_cache

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (16, 32, 48, 64)
#: sizes for a target with an exact-verification limit (`TargetAdapter.max_tree_tokens`), lookup tokens excluded
CAPPED_SIZES = (6, 8, 10, 12)
DEFAULT_DEPTHS = (3, 5, 7)


@dataclass
class TreeChoice:
    """The chosen tree and the measurements behind it. Times are median seconds."""

    params: TreeParams
    forward_times: dict[int, float]  # tree size -> one target forward over its tokens
    grafted_forward_times: dict[int, float]  # tree size -> one target forward over its tokens and the lookup's
    proposal_times: dict[int, float]  # depth -> one draft proposal
    candidates: list[dict]  # per (total_tokens, depth): pilot tau, graft share and estimated tokens per second

    def as_dict(self) -> dict:
        return {
            "chosen": {
                "total_tokens": self.params.total_tokens,
                "depth": self.params.depth,
                "top_k": self.params.top_k,
                "lookup_tokens": self.params.lookup_tokens,
            },
            "forward_times": self.forward_times,
            "grafted_forward_times": self.grafted_forward_times,
            "proposal_times": self.proposal_times,
            "candidates": self.candidates,
        }


@torch.no_grad()
def time_target_forward(target: TargetAdapter, inputs, sizes: Sequence[int], repeats: int = 3) -> dict[int, float]:
    """Median time of one target forward over a chain of n tokens appended after the prompt, for each n in sizes."""
    prefill, state = target.prefill(inputs)
    prompt_length = state.length
    token = int(prefill.logits.argmax())
    times = {}
    for size in sizes:
        tree = DraftTree.chain([token] * size)
        mask = tree.ancestor_mask()
        samples = []
        for _ in range(repeats + 1):  # the first run is a warm-up
            start = wall_clock(target.device)
            target.forward_tree(state, tree.tokens, tree.depths, mask)
            samples.append(wall_clock(target.device) - start)
            truncate_cache(state.cache, prompt_length)
            state.length = prompt_length
        times[size] = statistics.median(samples[1:])
    return times


@torch.no_grad()
def time_draft_proposal(
    target: TargetAdapter, draft: DraftModel, inputs, tree: TreeParams, depths: Sequence[int], repeats: int = 3
) -> dict[int, float]:
    """Median time of one draft proposal (a whole tree) at each depth, with the largest candidate tree size."""
    prefill, state = target.prefill(inputs)
    drafter = MSDDrafter(draft, target)
    first_token = int(prefill.logits.argmax())
    drafter.start(prefill, state, first_token)
    kept = drafter.cache_length
    times = {}
    for depth in depths:
        samples = []
        for _ in range(repeats + 1):
            start = wall_clock(target.device)
            drafter.propose(first_token, replace(tree, depth=depth), max_depth=depth)
            samples.append(wall_clock(target.device) - start)
            drafter.runner.truncate(kept)  # drop the slots the proposal appended
        times[depth] = statistics.median(samples[1:])
    return times


def tune_tree(
    target: TargetAdapter,
    draft: DraftModel,
    inputs: Mapping[str, torch.Tensor],
    base: TreeParams,
    sizes: Sequence[int] | None = None,
    depths: Sequence[int] = DEFAULT_DEPTHS,
    pilot_tokens: int = 64,
) -> TreeChoice:
    """Pick total_tokens and depth for this machine (see the module docstring); top_k is kept from `base`."""
    limit = target.max_tree_tokens
    if sizes is None:
        sizes = DEFAULT_SIZES if limit is None else [size for size in CAPPED_SIZES if size <= limit] or [limit]
    sizes = sorted(set(sizes))
    depths = sorted(set(depths))
    if limit is not None and max(sizes) > limit:
        exact = [size for size in sizes if size <= limit]
        if not exact:
            raise MSDError(
                f"every tree size in {sizes} is above {limit}, the largest tree this target's batch-invariant "
                f"bfloat16 CPU kernels verify exactly. Pass --tune-sizes with sizes of {limit} or less."
            )
        logger.warning("tree sizes above %d skipped: this target verifies at most %d tokens exactly", limit, limit)
        sizes = exact
    grafted = {size: size + base.lookup_tokens if limit is None else min(size + base.lookup_tokens, limit)
               for size in sizes}
    timed = time_target_forward(target, inputs, sorted(set(sizes) | set(grafted.values())))
    forward_times = {size: timed[size] for size in sizes}
    grafted_times = {size: timed[grafted[size]] for size in sizes}
    proposal_times = time_draft_proposal(target, draft, inputs, replace(base, total_tokens=max(sizes)), depths)
    logger.info("target forward time by tree size: %s", milliseconds(forward_times))
    if base.lookup_tokens:
        logger.info("with up to %d lookup tokens: %s", base.lookup_tokens, milliseconds(grafted_times))
    logger.info("draft proposal time by depth: %s", milliseconds(proposal_times))

    candidates = []
    for size in sizes:
        for depth in depths:
            if depth >= size:
                continue
            params = replace(base, total_tokens=size, depth=depth)
            # End-of-sequence tokens are ignored so that every pilot decodes pilot_tokens tokens.
            generator = SpeculativeGenerator(target, draft, params)
            stats = generator.generate(inputs, max_new_tokens=pilot_tokens, eos_token_ids=[]).stats
            share = generator.drafter.grafts / stats.target_forwards if stats.target_forwards else 0.0
            cycle = (1 - share) * forward_times[size] + share * grafted_times[size] + proposal_times[depth]
            candidates.append({
                "total_tokens": size, "depth": depth, "tau": stats.tau, "graft_share": share,
                "tokens_per_second": stats.tau / cycle,
            })
    if not candidates:
        raise ValueError(f"no candidate tree: every depth in {depths} is at least every size in {sizes}")
    best = max(candidates, key=lambda candidate: candidate["tokens_per_second"])
    chosen = replace(base, total_tokens=best["total_tokens"], depth=best["depth"])
    logger.info("chose total_tokens=%d depth=%d (estimated %.1f tokens/s)", chosen.total_tokens, chosen.depth,
                best["tokens_per_second"])
    return TreeChoice(chosen, forward_times, grafted_times, proposal_times, candidates)


def milliseconds(times: dict[int, float]) -> str:
    """Format {size: seconds} as "size: N.N ms" pairs for a log line."""
    return ", ".join(f"{key}: {seconds * 1e3:.1f} ms" for key, seconds in times.items())
