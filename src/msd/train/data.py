"""Feature sources for training: opening `msd prepare-data` folders, checking them against the target, and the
held-out split used for evaluation.

A feature dataset is a map-style dataset of per-sample dicts that the collate function turns into the batch
contract of `msd.data.dataset.collate_features`: input_ids (B, T), hidden_states (B, T, H), visual_embeds (B, T, H),
visual_mask (B, T), loss_mask (B, T), attention_mask (B, T) and position_ids (P, B, T). Its dataset card's
`settings` name the dataset kind and the target the features came from (target_model_type, hidden_size,
vocab_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from zlib import crc32

import numpy as np
from torch.utils.data import ConcatDataset

from msd.errors import MSDError

HELD_OUT_FRACTION = 10  # at most one sample in ten is held out


@dataclass
class FeatureSource:
    """One training source: the dataset, the indices trained on and the held-out indices."""

    name: str  # "text" or "multimodal"
    dataset: object
    train_indices: np.ndarray
    held_out: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train_indices)


#: dataset-card settings that every folder of one training source must share
SHARED_SETTINGS = ("kind", "target_model_type", "hidden_size", "vocab_size", "position_rows", "image_token_id")


def open_feature_folder(folder: str | Path):
    """Open a folder written by `msd prepare-data`; a missing or empty folder raises MSDError."""
    from msd.data.dataset import FeatureDataset

    folder = Path(folder)
    if folder.is_file():
        raise MSDError(
            f"{folder} is a file, but training reads the feature folders `msd prepare-data` writes. Run msd "
            f"prepare-data --data {folder} --output FOLDER first and pass FOLDER."
        )
    if not folder.is_dir():
        raise MSDError(f"feature folder not found: {folder}. Write it with `msd prepare-data` first.")
    dataset = FeatureDataset(folder)
    if len(dataset) == 0:
        raise MSDError(f"feature folder {folder} contains no samples. Run `msd prepare-data` on a non-empty data set.")
    return dataset


class FeatureFolders(ConcatDataset):
    """Several `msd prepare-data` folders of one kind, read as one dataset in the order given.

    `card` is the first folder's card; the folders must agree on the settings in SHARED_SETTINGS.
    """

    def __init__(self, datasets: list):
        super().__init__(datasets)
        first = datasets[0]
        for dataset in datasets[1:]:
            differences = [
                f"{name} {dataset.card['settings'].get(name)!r} (in {first.folder}: {first.card['settings'].get(name)!r})"
                for name in SHARED_SETTINGS
                if dataset.card["settings"].get(name) != first.card["settings"].get(name)
            ]
            if differences:
                raise MSDError(
                    f"the feature folder {dataset.folder} cannot be trained on together with {first.folder}: "
                    + "; ".join(differences) + ". Pass folders of one kind, prepared with the same target."
                )
        self.card = first.card


def open_feature_folders(folders: list[str | Path]):
    """Open one or more `msd prepare-data` folders as one dataset (see `FeatureFolders`)."""
    datasets = [open_feature_folder(folder) for folder in folders]
    return datasets[0] if len(datasets) == 1 else FeatureFolders(datasets)


def default_collate():
    """The batch collate function of `msd.data.dataset`."""
    from msd.data.dataset import collate_features

    return collate_features


def check_features_fit(dataset, target, label: str, kind: str) -> None:
    """Raise MSDError unless `dataset` contains `kind` features ("text" or "vision") made by a target like `target`."""
    if len(dataset) == 0:
        raise MSDError(f"the {label} feature set contains no samples. Run `msd prepare-data` on a non-empty data set.")
    settings = dataset.card.get("settings", {})
    if settings.get("kind") != kind:
        raise MSDError(
            f"the {label} feature set contains {settings.get('kind')!r} features, expected {kind!r}. "
            "Pass text features with --text-data and multimodal features with --vision-data."
        )
    expected = {
        "target_model_type": target.config.model_type,
        "hidden_size": target.hidden_size,
        "vocab_size": target.vocab_size,
        "position_rows": target.position_rows,
        "image_token_id": target.image_token_id,
    }
    problems = [
        f"{name} {settings.get(name)!r} (target: {value!r})"
        for name, value in expected.items()
        if settings.get(name) != value
    ]
    if problems:
        raise MSDError(
            f"the {label} features were made with a different target: " + "; ".join(problems) + ". "
            "Prepare the data with the target you train the draft for."
        )


def split_source(name: str, dataset, eval_samples: int, seed: int) -> FeatureSource:
    """Hold out min(eval_samples, max(size / 10, 1)) samples, chosen by a seeded permutation, for evaluation.

    A source of one sample keeps no sample out, so it is still trained on.
    """
    size = len(dataset)
    held_count = min(eval_samples, max(size // HELD_OUT_FRACTION, 1)) if size > 1 else 0
    order = np.random.default_rng([seed, crc32(name.encode())]).permutation(size)
    return FeatureSource(
        name=name,
        dataset=dataset,
        train_indices=np.sort(order[held_count:]),
        held_out=np.sort(order[:held_count]),
    )
