"""The MSD draft model, its config and the fit check against a target."""

from msd.draft.config import DraftConfig
from msd.draft.model import DraftModel, causal_mask

__all__ = ["DraftConfig", "DraftModel", "causal_mask"]
