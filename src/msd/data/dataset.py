"""Reading prepared target features for draft training.

`FeatureDataset(folder)` reads every part's manifest in the folder that `msd prepare-data` wrote. Sample i is a dict
of tensors (T tokens, H hidden size, N visual tokens, P position rows):

    input_ids      long (T,)
    hidden_states  (T, H) in the stored 16-bit dtype: the target's last-layer hidden states after the final norm
    visual_embeds  (N, H) in the stored dtype: compact, the rows at visual positions in order
    visual_mask    bool (T,)
    loss_mask      bool (T,)       True on assistant-turn tokens
    position_ids   long (P, T)     P = 3 for Qwen2-VL; for 1-D families rebuilt as arange(T) with P = 1

`collate_features(batch)` pads a list of samples to the longest T on the right:

    input_ids      long (B, T)     padding: 0
    hidden_states  (B, T, H)       padding: 0
    visual_embeds  (B, T, H)       scattered to the visual positions; 0 elsewhere
    visual_mask    bool (B, T)     False on padding
    loss_mask      bool (B, T)     False on padding
    attention_mask bool (B, T)     False on padding
    position_ids   long (P, B, T)  padding: 0

`dataset.card` is the dataset card (target model_type, hidden size, vocab size, dataset kind, dtype, counts) and
`dataset.lengths` the token count of each sample, for length-grouped sampling.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from msd.data.rows import Part
from msd.data.storage import CARD_NAME, MANIFEST_SUFFIX, read_part_states
from msd.errors import MSDError

logger = logging.getLogger(__name__)

FIELDS = ("input_ids", "hidden_states", "visual_embeds", "visual_mask", "loss_mask")


def missing_parts(states: dict) -> list[str]:
    """Return the names of the parts that no run has started, out of the part counts in the started parts' names."""
    counts = {int(name.rsplit("-of-", 1)[1]) for name in states}
    expected = {Part(index, count).name for count in counts for index in range(count)}
    return sorted(expected - set(states))


class FeatureDataset(Dataset):
    """The samples of a prepared-features folder, in part order and, within a part, in row order."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        card_path = self.folder / CARD_NAME
        if not card_path.is_file():
            raise MSDError(f"{CARD_NAME} not found in {self.folder}; prepare the folder with msd prepare-data first.")
        self.card = json.loads(card_path.read_text())
        settings = self.card["settings"]
        self.kind: str = settings["kind"]
        self.hidden_size: int = settings["hidden_size"]
        self.position_rows: int = settings["position_rows"]
        self.entries: list[dict] = []
        for manifest in sorted(self.folder.glob(f"*{MANIFEST_SUFFIX}")):
            with open(manifest, encoding="utf-8") as handle:
                self.entries += [json.loads(line) for line in handle if line.strip()]
        self.lengths = [entry["length"] for entry in self.entries]
        states = read_part_states(self.folder)
        unfinished = [name for name, state in states.items() if not state.finished]
        unfinished += [f"{name} (not started)" for name in missing_parts(states)]
        if unfinished:
            logger.warning(
                "%s: parts not finished: %s. Only the samples stored so far are read. Run msd prepare-data again with "
                "the same options (and each missing --shard) to finish.", self.folder, ", ".join(unfinished),
            )
        self._handles: dict[str, object] = {}  # shard file -> open safetensors handle

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        shard = self._open(entry["shard"])
        key = entry["key"]
        sample = {name: shard.get_tensor(f"{key}/{name}") for name in FIELDS}
        sample["input_ids"] = sample["input_ids"].long()
        sample["visual_mask"] = sample["visual_mask"].bool()
        sample["loss_mask"] = sample["loss_mask"].bool()
        length = sample["input_ids"].shape[0]
        if self.position_rows > 1:
            sample["position_ids"] = shard.get_tensor(f"{key}/position_ids").long()
        else:
            sample["position_ids"] = torch.arange(length).view(1, length)
        return sample

    def _open(self, shard: str):
        # Opened lazily, so each DataLoader worker opens its own handles after the fork.
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def collate_features(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad samples to one batch (shapes in the module docstring)."""
    size = len(batch)
    length = max(sample["input_ids"].shape[0] for sample in batch)
    hidden_size = batch[0]["hidden_states"].shape[1]
    rows = batch[0]["position_ids"].shape[0]
    dtype = batch[0]["hidden_states"].dtype

    input_ids = torch.zeros(size, length, dtype=torch.long)
    hidden_states = torch.zeros(size, length, hidden_size, dtype=dtype)
    visual_embeds = torch.zeros(size, length, hidden_size, dtype=dtype)
    visual_mask = torch.zeros(size, length, dtype=torch.bool)
    loss_mask = torch.zeros(size, length, dtype=torch.bool)
    attention_mask = torch.zeros(size, length, dtype=torch.bool)
    position_ids = torch.zeros(rows, size, length, dtype=torch.long)
    for row, sample in enumerate(batch):
        count = sample["input_ids"].shape[0]
        input_ids[row, :count] = sample["input_ids"]
        hidden_states[row, :count] = sample["hidden_states"]
        visual_mask[row, :count] = sample["visual_mask"]
        visual_embeds[row, :count][sample["visual_mask"]] = sample["visual_embeds"].to(dtype)
        loss_mask[row, :count] = sample["loss_mask"]
        attention_mask[row, :count] = True
        position_ids[:, row, :count] = sample["position_ids"]
    return {
        "input_ids": input_ids,
        "hidden_states": hidden_states,
        "visual_embeds": visual_embeds,
        "visual_mask": visual_mask,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }
