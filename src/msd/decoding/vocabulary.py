"""The tokens a draft can propose for one sequence.

A draft with a reduced vocabulary scores only its own rows of the target's LM head (`DraftModel.draft_to_target`),
chosen by frequency in its training answers. Answers often repeat words of their prompt that are rare in general:
names, technical terms, the topic itself. The target then ranks such a token first, and no proposal can match it.

`DraftVocabulary.for_prompt` adds the prompt's other text tokens (chat template included) to the draft's rows for one
sequence. Their scores use the same target LM-head rows as every other token on the draft's predicted feature, so the
draft needs no retraining. The target verifies every proposed token, so output stays exactly the target's. The gain
is small: on the embedded default's four validation questions, tau with a 16-token tree rose from 2.44 to 2.47. The
draft was never trained to rank these tokens first, so they enter wide trees as siblings more often than chains.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from msd.draft.model import DraftModel
from msd.draft.quantize import Int8Linear


class DraftVocabulary:
    """Draft-vocabulary indices for one sequence: the draft's own tokens, then the added ones.

    V is the draft's vocabulary size and E the number of added tokens. Indices V .. V + E - 1 are the added tokens.
    """

    def __init__(
        self, draft: DraftModel, added_ids: torch.Tensor | None = None, added_head: torch.Tensor | None = None
    ):
        self.draft = draft
        self.added_ids = added_ids  # (E,) target ids, or None
        self.added_head = added_head  # (E, H) the target's LM-head rows of added_ids, or None
        self.added_layer = None  # the same rows as int8 weights, for a draft whose own head rows are int8
        if added_head is not None and draft.int8_head:
            self.added_layer = Int8Linear.from_weight(added_head)

    @classmethod
    def for_prompt(
        cls, draft: DraftModel, lm_head_weight: torch.Tensor, prompt_ids: torch.Tensor, skip_ids: Iterable[int] = ()
    ) -> DraftVocabulary:
        """Add the tokens of `prompt_ids` (L,) the draft cannot propose yet, except `skip_ids` (special tokens).

        A draft scoring the whole target vocabulary gets nothing added. lm_head_weight: (V_target, H).
        """
        if draft.draft_to_target is None:
            return cls(draft)
        device = lm_head_weight.device
        known = torch.zeros(lm_head_weight.shape[0], dtype=torch.bool, device=device)
        known[draft.draft_to_target.to(device)] = True
        skip = torch.tensor(sorted(set(skip_ids)), dtype=torch.long, device=device)
        known[skip[skip < known.shape[0]]] = True
        candidates = prompt_ids.to(device).unique()
        added = candidates[~known[candidates]]  # (E,) sorted target ids
        if added.numel() == 0:
            return cls(draft)
        return cls(draft, added, lm_head_weight[added].detach())

    @property
    def added_count(self) -> int:
        return 0 if self.added_ids is None else self.added_ids.shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits over this vocabulary: (..., H) -> (..., V + E)."""
        logits = self.draft.compute_logits(hidden)
        if self.added_head is None:
            return logits
        if self.added_layer is not None:
            added = self.added_layer(hidden)  # (..., E)
        else:
            added = F.linear(hidden.to(self.added_head.dtype), self.added_head)
        return torch.cat([logits, added.to(logits.dtype)], dim=-1)

    def to_target_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Map indices into this vocabulary to target token ids."""
        if self.added_ids is None:
            return self.draft.to_target_ids(indices)
        own = self.draft.draft_to_target.shape[0]
        is_added = indices >= own
        from_draft = self.draft.to_target_ids(indices.clamp(max=own - 1))
        return torch.where(is_added, self.added_ids[(indices - own).clamp(min=0)], from_draft)
