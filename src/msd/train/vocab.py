"""Choosing a reduced draft vocabulary: the target tokens the draft most often has to predict in its training data.

A draft that scores the target's whole vocabulary pays for the full LM head at every drafting step. On a CPU that
head can cost a quarter of a target step. EAGLE-3 instead gives the draft the N most frequent target tokens and maps
its choices back to target ids (`DraftModel.draft_to_target`). Verification is untouched, so decoding stays lossless;
a target token outside the draft vocabulary can only be accepted as the target's own bonus token.

Counted are the tokens at loss positions, i.e. the tokens draft slots are trained to propose (`msd.train.loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from tqdm import tqdm

from msd.errors import MSDError

logger = logging.getLogger(__name__)


def count_loss_tokens(samples: Iterable[dict[str, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """Count how often each target token id occurs at a loss position; returns (vocab_size,) int64 counts.

    A sample follows the `msd.data.dataset.FeatureDataset` contract (input_ids (T,), loss_mask (T,) bool). Slot j
    proposes x_{j+2}, so the first two positions never count.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for sample in samples:
        loss_mask = sample["loss_mask"].bool().clone()  # (T,)
        loss_mask[:2] = False
        counts += torch.bincount(sample["input_ids"][loss_mask].long(), minlength=vocab_size)[:vocab_size]
    return counts


def choose_draft_vocab(counts: torch.Tensor, size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """Pick the `size` target ids to keep, sorted ascending: every id in `always`, then the most frequent others.

    Ties in frequency go to the lower id, so the choice is deterministic. When the data has fewer distinct tokens
    than `size`, the unseen ids with the lowest numbers fill the rest; in a BPE vocabulary those are the byte tokens
    and the earliest (most frequent) merges. Raises MSDError when `size` does not lie between len(always) + 1 and the
    target's vocabulary size.
    """
    vocab_size = counts.shape[0]
    always = sorted(set(int(token) for token in always))
    if not len(always) < size <= vocab_size:
        raise MSDError(
            f"draft_vocab_size must lie between {len(always) + 1} and the target's vocabulary size {vocab_size}, "
            f"got {size}. Pick a smaller value, or leave it unset to use the whole vocabulary."
        )
    if any(not 0 <= token < vocab_size for token in always):
        raise MSDError(f"token ids {always} lie outside the target's vocabulary of {vocab_size}.")
    ranking = counts.double() - torch.arange(vocab_size, dtype=torch.double) / vocab_size  # ties: lower id first
    ranking[always] = float("inf")
    chosen = torch.topk(ranking, size).indices
    return torch.sort(chosen).values


def draft_vocab_from_datasets(sources: Iterable[tuple[object, Sequence[int]]], target, size: int) -> torch.Tensor:
    """Choose `size` draft-vocabulary ids from the training samples of `sources` ((dataset, indices) pairs).

    The target's EOS ids are always kept, so the draft can propose the end of a reply. Logs the share of the
    counted tokens that the chosen vocabulary covers.
    """
    counts = torch.zeros(target.vocab_size, dtype=torch.long)
    for dataset, indices in sources:
        samples = (dataset[int(index)] for index in tqdm(indices, desc="counting draft vocabulary", leave=False))
        counts += count_loss_tokens(samples, target.vocab_size)
    chosen = choose_draft_vocab(counts, size, always=target.eos_token_ids)
    total = int(counts.sum())
    if total:
        logger.info(
            "draft vocabulary: %d of %d target tokens cover %.2f%% of %d loss tokens (%d distinct seen)",
            size,
            target.vocab_size,
            100.0 * int(counts[chosen].sum()) / total,
            total,
            int((counts > 0).sum()),
        )
    return chosen
