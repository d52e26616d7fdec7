"""FeatureDataset over stored shards and collate_features padding."""

from __future__ import annotations

import pytest
import torch
from data_helpers import chat, write_images
from tiny_models import build_llava
from torch.utils.data import DataLoader

from msd.data.dataset import FeatureDataset, collate_features
from msd.data.prepare import PrepareSettings, prepare_features
from msd.errors import MSDError
from msd.targets import adapter_for


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    write_images(root / "images", {"a.png": (60, 50)})
    model, processor = build_llava(seed=0)
    rows = [
        chat("<image>\nWhat is it?", "A cat.", image="a.png", row_id="img"),
        chat("What are numbers?", "Numbers 0 1 2 3 make words and sentences.", row_id="text"),
    ]
    settings = PrepareSettings(
        output=root / "out", kind="vision", max_length=1000, image_root=root / "images", shard_size=1
    )
    prepare_features(adapter_for(model, processor), rows, settings)
    return settings.output


def test_samples(folder):
    dataset = FeatureDataset(folder)
    assert len(dataset) == 2
    assert dataset.kind == "vision"
    assert dataset.position_rows == 1
    image, text = dataset[0], dataset[1]
    length = image["input_ids"].shape[0]
    assert image["input_ids"].dtype == torch.long
    assert image["hidden_states"].shape == (length, dataset.hidden_size)
    assert image["visual_embeds"].shape == (int(image["visual_mask"].sum()), dataset.hidden_size)
    assert text["visual_embeds"].shape == (0, dataset.hidden_size)
    assert torch.equal(image["position_ids"], torch.arange(length).view(1, length))
    assert image["loss_mask"].dtype == torch.bool
    assert image["loss_mask"].any()
    assert dataset.lengths == [length, text["input_ids"].shape[0]]


def test_collate_pads_and_scatters(folder):
    dataset = FeatureDataset(folder)
    samples = [dataset[0], dataset[1]]
    batch = collate_features(samples)
    lengths = [sample["input_ids"].shape[0] for sample in samples]
    size, longest = 2, max(lengths)
    hidden = dataset.hidden_size
    assert batch["input_ids"].shape == (size, longest)
    assert batch["hidden_states"].shape == (size, longest, hidden)
    assert batch["visual_embeds"].shape == (size, longest, hidden)
    assert batch["position_ids"].shape == (1, size, longest)
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        assert batch["attention_mask"][row].tolist() == [True] * length + [False] * (longest - length)
        assert torch.equal(batch["input_ids"][row, :length], sample["input_ids"])
        assert torch.equal(batch["hidden_states"][row, :length], sample["hidden_states"])
        assert not batch["loss_mask"][row, length:].any()
        assert not batch["visual_mask"][row, length:].any()
        visual = batch["visual_mask"][row]
        assert torch.equal(batch["visual_embeds"][row][visual], sample["visual_embeds"])
        assert not batch["visual_embeds"][row][~visual].any()


def test_dataloader_workers(folder):
    loader = DataLoader(FeatureDataset(folder), batch_size=2, collate_fn=collate_features, num_workers=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 2


def test_collate_three_row_positions():
    sample = {
        "input_ids": torch.tensor([5, 6, 7]),
        "hidden_states": torch.ones(3, 4),
        "visual_embeds": torch.full((1, 4), 2.0),
        "visual_mask": torch.tensor([False, True, False]),
        "loss_mask": torch.tensor([False, False, True]),
        "position_ids": torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 4]]),
    }
    short = {**sample, "input_ids": torch.tensor([5]), "hidden_states": torch.ones(1, 4),
             "visual_embeds": torch.zeros(0, 4), "visual_mask": torch.tensor([False]),
             "loss_mask": torch.tensor([True]), "position_ids": torch.zeros(3, 1, dtype=torch.long)}
    batch = collate_features([sample, short])
    assert batch["position_ids"].shape == (3, 2, 3)
    assert torch.equal(batch["position_ids"][:, 0], sample["position_ids"])
    assert batch["visual_embeds"][0, 1].tolist() == [2.0] * 4


def test_missing_folder(tmp_path):
    with pytest.raises(MSDError, match="prepare-data"):
        FeatureDataset(tmp_path)
