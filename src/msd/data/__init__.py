"""Training data for the draft: LLaVA-format conversations -> target features on disk -> padded training batches."""

from msd.data.conversations import Conversation, ConversationEncoder, RowError, SkipReason, parse_row
from msd.data.dataset import FeatureDataset, collate_features
from msd.data.prepare import KIND_ALIASES, KINDS, PrepareSettings, PrepareSummary, prepare_features, resolve_kind
from msd.data.rows import Part, open_rows

__all__ = [
    "KINDS",
    "KIND_ALIASES",
    "Conversation",
    "ConversationEncoder",
    "FeatureDataset",
    "Part",
    "PrepareSettings",
    "PrepareSummary",
    "RowError",
    "SkipReason",
    "collate_features",
    "open_rows",
    "parse_row",
    "prepare_features",
    "resolve_kind",
]
