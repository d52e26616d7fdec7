"""The training slots' alignment and loss mask, and the feature noise, on hand-built batches."""

import torch

from msd.data import collate_features
from msd.train import build_slots
from msd.train.loss import add_uniform_noise

HIDDEN = 4


def sample(tokens: list[int], answer_from: int) -> dict[str, torch.Tensor]:
    """Build a text sample whose tokens from `answer_from` on are the assistant's. Feature t is filled with t + 1."""
    count = len(tokens)
    loss_mask = torch.zeros(count, dtype=torch.bool)
    loss_mask[answer_from:] = True
    return {
        "input_ids": torch.tensor(tokens),
        "hidden_states": torch.arange(1, count + 1, dtype=torch.float32)[:, None].expand(count, HIDDEN).clone(),
        "visual_embeds": torch.zeros(0, HIDDEN),
        "visual_mask": torch.zeros(count, dtype=torch.bool),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(count)[None],
    }


def test_slot_reads_feature_before_its_token():
    # Slot j pairs token x_{j+1} with feature h_j and is trained towards h_{j+1}.
    slots = build_slots(collate_features([sample([10, 11, 12, 13, 14], answer_from=3)]))
    assert slots.token_ids[0].tolist() == [11, 12, 13, 14]
    assert slots.features[0, :, 0].tolist() == [1, 2, 3, 4]
    assert slots.target_features[0, :, 0].tolist() == [2, 3, 4, 5]
    assert slots.position_ids[0, 0].tolist() == [1, 2, 3, 4]


def test_slot_counts_assistant_proposals():
    # Slot j proposes x_{j+2}, so it counts exactly when x_{j+2} is an assistant token. The last slot never counts.
    slots = build_slots(collate_features([sample([10, 11, 12, 13, 14, 15], answer_from=3)]))
    assert slots.counted[0].tolist() == [False, True, True, True, False]


def test_padding_slots_never_count():
    # In a batch padded to the longer sample, the shorter one's slots past its end do not count.
    batch = collate_features([sample([10, 11, 12, 13], answer_from=2), sample([20, 21, 22, 23, 24, 25], answer_from=2)])
    slots = build_slots(batch)
    assert slots.counted[0].tolist() == [True, True, False, False, False]
    assert slots.counted[1].tolist() == [True, True, True, True, False]


def test_noise_reaches_large_bfloat16_features():
    # Noise of width 0.2 moves every entry of bfloat16 features of magnitude 40, whose spacing is 0.25.
    features = torch.full((64, HIDDEN), 40.0, dtype=torch.bfloat16)
    noisy = add_uniform_noise(features, 0.2, torch.Generator().manual_seed(0))
    moved = (noisy - 40.0).abs()
    assert noisy.dtype == torch.float32
    assert float((moved > 0).float().mean()) > 0.99
    assert float(moved.max()) <= 0.1
