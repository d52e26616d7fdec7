"""The draft's training objective on stored target features, with the slot alignment used at inference.

Alignment. A stored sequence has tokens x_0 .. x_{T-1}, the target's last-layer features h_0 .. h_{T-1} (after the
final norm), and the projected visual embeddings v_t at visual positions. As in `msd.draft.model` and the drafter's
prefill, draft slot j (j = 0 .. T-2) reads

    token x_{j+1}, feature h_j (plus uniform noise in training), v_{j+1} when x_{j+1} is visual, position of x_{j+1}

and its output is trained towards h_{j+1}:

    feature loss: SmoothL1(draft output_j, h_{j+1}), averaged over the hidden size
    token loss:   cross-entropy from softmax(head(h_{j+1})) to log_softmax(head(draft output_j))

where head is the target's frozen LM head. With a reduced draft vocabulary head keeps only the draft vocabulary's
rows, so the target distribution is renormalised over the draft vocabulary: the draft learns the target's ranking
among the tokens it can propose, which is what drafting needs. Agreement (draft top-1 equals target top-1) is then
measured against the target's top-1 over its whole vocabulary, so a target token the draft cannot propose counts as
a miss.

Loss mask. head(h_{j+1}) is the target's distribution for token x_{j+2}, and at inference slot j's output proposes
that token. Slot j therefore counts when x_{j+2} is an assistant token (`loss_mask[j+2]`) and x_{j+1}, x_{j+2} are
not padding. The last slot (j = T-2) never counts, because its x_{j+2} lies beyond the sequence. Both losses are
means over counted slots. In training the mean runs over all counted slots of an optimizer step (every micro-batch
and process, `count_step_slots`), so each slot weighs the same whatever micro-batch it falls in. Without such totals
`compute_loss` takes the mean over the batch it is given.

Unrolled steps (`unroll_steps` n > 1, the training-time test of EAGLE-3). At inference only the first draft step reads
a target feature; draft step s reads the draft's own output of step s - 1. Training step s therefore runs the draft
again with slot j reading

    token x_{j+1}, feature o^{s-1}_{j-1} (the previous step's output one slot back), position of x_{j+1}

and attending, as the drafter's cache does, to the first step's slots up to its anchor a = j - s + 1 (computed from
target features) and to its own chain: step t's slot a + t - 1 for t = 2 .. s. Its output is trained towards
h_{j+1} as before. Slot j of step s counts when slot j and the anchor slot a both count, so the whole drafted chain
lies in an assistant turn. The loss is the mean over the steps that have counted slots, and agreement is reported per
step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from msd.errors import MSDError
from msd.train.option_types import check_field_types


@dataclass(frozen=True)
class LossConfig:
    """Weights of the two loss parts, the width of the input-feature noise and the number of unrolled draft steps.

    The defaults are the values of the EAGLE and MSD research training: feature weight 1.0, token weight 0.1,
    noise drawn uniformly from [-noise_width / 2, noise_width / 2] with noise_width 0.2, and one step (the draft
    always reads target features). unroll_steps n > 1 also trains draft steps 2 .. n on the draft's own outputs, at
    up to n times the time of a training step.
    """

    feature_weight: float = 1.0
    token_weight: float = 0.1
    noise_width: float = 0.2
    unroll_steps: int = 1

    def __post_init__(self):
        check_field_types(self, "loss option")
        for name in ("feature_weight", "token_weight", "noise_width"):
            if getattr(self, name) < 0:
                raise MSDError(f"loss option {name} must be zero or positive, got {getattr(self, name)}.")
        steps = self.unroll_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise MSDError(
                f"loss option unroll_steps (--unroll-steps) must be a whole number of at least 1, got {steps!r}. "
                "1 trains the first draft step only; N > 1 also trains steps 2 .. N, which read the draft's own "
                "output, as deep as the tree you will draft (2 for a depth-2 chain)."
            )


@dataclass
class DraftSlots:
    """One batch laid out as draft slots (see the module docstring). S = T - 1 slots per sequence."""

    token_ids: torch.Tensor  # (B, S) x_{j+1}
    features: torch.Tensor  # (B, S, H) h_j
    visual_embeds: torch.Tensor  # (B, S, H) v_{j+1}, zeros at text slots
    visual_mask: torch.Tensor  # (B, S) bool, x_{j+1} is visual
    position_ids: torch.Tensor  # (P, B, S) position of x_{j+1}
    attention_mask: torch.Tensor  # (B, 1, S, S) bool, True where a slot may attend
    target_features: torch.Tensor  # (B, S, H) h_{j+1}
    counted: torch.Tensor  # (B, S) bool, the slot enters the loss

    @property
    def count(self) -> int:
        return int(self.counted.sum())


@dataclass
class LossOutput:
    """The weighted loss (differentiable) and detached parts for logging; agreements and slots are the first step's.

    `loss` is normalised by the slot totals given to `compute_loss`, so in training it is this micro-batch's share of
    the step's loss. `mean_loss`, `feature_loss` and `token_loss` are means over this batch's own counted slots.
    """

    loss: torch.Tensor
    mean_loss: torch.Tensor
    feature_loss: torch.Tensor
    token_loss: torch.Tensor
    agreements: int  # counted slots where the draft's top-1 token equals the target's
    slots: int  # counted slots
    step_agreements: tuple[int, ...] = ()  # agreements per unrolled step, the first step included
    step_slots: tuple[int, ...] = ()


def build_slots(batch: dict[str, torch.Tensor]) -> DraftSlots:
    """Shift a feature batch (the `collate_features` contract) into draft slots.

    The attention mask is causal over the slots and hides padded keys. Each slot always attends to itself, so a padded
    slot's attention row is never empty (its output is excluded from the loss anyway).
    """
    input_ids = batch["input_ids"]  # (B, T)
    if input_ids.shape[1] < 3:
        raise MSDError(
            f"feature sequences must contain at least 3 tokens for one training slot, got {input_ids.shape[1]}. "
            "Drop such samples when preparing the data."
        )
    hidden = batch["hidden_states"]  # (B, T, H)
    present = batch["attention_mask"].bool()  # (B, T)

    slot_present = present[:, 1:]  # (B, S)
    length = slot_present.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=input_ids.device))
    attention = causal[None] & slot_present[:, None, :]
    attention |= torch.eye(length, dtype=torch.bool, device=input_ids.device)[None]

    return DraftSlots(
        token_ids=input_ids[:, 1:],
        features=hidden[:, :-1],
        visual_embeds=batch["visual_embeds"][:, 1:],
        visual_mask=batch["visual_mask"].bool()[:, 1:],
        position_ids=batch["position_ids"][:, :, 1:],
        attention_mask=attention[:, None],
        target_features=hidden[:, 1:],
        counted=counted_slots(batch),
    )


def counted_slots(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask (B, S) of the slots that enter the loss, from the batch's loss and attention masks alone."""
    present = batch["attention_mask"].bool()  # (B, T)
    loss_mask = batch["loss_mask"].bool()  # (B, T)
    counted = torch.zeros_like(present[:, 1:])
    counted[:, :-1] = loss_mask[:, 2:] & present[:, 2:] & present[:, 1:-1]
    return counted


def add_uniform_noise(features: torch.Tensor, width: float, generator: torch.Generator | None) -> torch.Tensor:
    """Add noise drawn uniformly from [-width / 2, width / 2] (EAGLE's feature augmentation), in float32.

    The noisy features stay float32, because in bfloat16 a noise of at most 0.1 would round away on every entry of
    magnitude 32 or more (the spacing there is 0.25).
    """
    if width == 0:
        return features
    noise = torch.rand(features.shape, generator=generator, device=features.device, dtype=torch.float32)
    return features.float() + (noise - 0.5) * width


def compute_loss(
    draft_forward,
    draft,
    slots: DraftSlots,
    config: LossConfig,
    generator: torch.Generator | None = None,
    target_head: torch.Tensor | None = None,
    slot_totals: tuple[float, ...] | None = None,
) -> LossOutput:
    """Run the draft over `slots` for `config.unroll_steps` steps and return the weighted feature and token losses.

    draft_forward: the callable that runs the draft (the DDP or DeepSpeed wrapper in distributed training);
    draft: the attached, unwrapped DraftModel whose frozen head scores both feature sets; generator: source of the
    feature noise, or None for no noise (evaluation). target_head: the target's full (V, H) LM head. A reduced draft
    vocabulary needs it to count agreement over the target's whole vocabulary, and without it agreement is counted
    within the draft vocabulary. slot_totals: per unrolled step, the number of counted slots that each step's loss
    sum is divided by (the trainer passes the optimizer step's totals, see `count_step_slots`). None divides by this
    batch's own counts, which makes the loss a mean over the batch.
    """
    features = slots.features
    if generator is not None:
        features = add_uniform_noise(features, config.noise_width, generator)
    steps = run_steps(draft_forward, slots, features, config.unroll_steps)
    parts = [step_loss(draft, output, slots.target_features, counted, target_head) for output, counted in steps]
    if slot_totals is None:
        slot_totals = tuple(part[3] if part else 0 for part in parts)
    if len(slot_totals) != len(parts):
        raise ValueError(f"slot_totals needs one count per unrolled step ({len(parts)}), got {len(slot_totals)}")
    step_agreements = tuple(part[2] if part else 0 for part in parts)
    step_slots = tuple(part[3] if part else 0 for part in parts)
    if parts[0] is None:  # no counted slot in the batch, so none in a later step either
        # Keeps every parameter in the graph, as DDP requires. The sum runs in float32, because a float16 model
        # (DeepSpeed fp16 runs without autocast) overflows a float16 sum to inf, and inf * 0 is NaN.
        zero = steps[0][0].float().sum() * 0.0
        return LossOutput(zero, zero.detach(), zero.detach(), zero.detach(), 0, 0, step_agreements, step_slots)

    weighted_steps = sum(1 for total in slot_totals if total > 0)  # steps with counted slots anywhere in the step
    # Only counted slots enter the sum: a term over the whole output would turn an inf at any slot into NaN.
    terms = [
        (config.feature_weight * part[0] + config.token_weight * part[1]) / total
        for part, total in zip(parts, slot_totals)
        if part is not None
    ]
    loss = torch.stack(terms).sum() / weighted_steps

    counted_parts = [part for part in parts if part is not None]
    feature_loss = torch.stack([part[0] / part[3] for part in counted_parts]).mean().detach()
    token_loss = torch.stack([part[1] / part[3] for part in counted_parts]).mean().detach()
    mean_loss = config.feature_weight * feature_loss + config.token_weight * token_loss
    return LossOutput(
        loss, mean_loss, feature_loss, token_loss, step_agreements[0], step_slots[0], step_agreements, step_slots
    )


def count_step_slots(counted: torch.Tensor, steps: int) -> tuple[int, ...]:
    """Count the slots of each unrolled draft step 1 .. `steps` that `run_steps` counts, given step 1's mask."""
    return tuple(int(step_counted(counted, step).sum()) for step in range(1, steps + 1))


def step_counted(counted: torch.Tensor, step: int) -> torch.Tensor:
    """Mask (B, S) of the slots counted at draft step `step`: the slot and its chain's anchor both count."""
    return counted if step == 1 else counted & shift_right(counted, step - 1)


def run_steps(draft_forward, slots: DraftSlots, features: torch.Tensor, steps: int):
    """Run draft steps 1 .. `steps` over `slots` and return each step's (output (B, S, H), counted (B, S) bool).

    features: (B, S, H) the first step's input features (the target's, with noise in training). Later steps read
    the previous step's output one slot back and attend through a shared KV cache, as the module docstring lays out.
    """
    cache = DynamicCache() if steps > 1 else None
    results = []
    for step in range(1, steps + 1):
        attention = slots.attention_mask if step == 1 else unrolled_attention(slots.attention_mask, step)
        if step > 1:
            features = shift_right(results[-1][0], 1)  # slot j reads the previous step's output at slot j - 1
        output = draft_forward(
            slots.token_ids,
            features,
            slots.position_ids,
            attention_mask=attention,
            cache=cache,
            visual_embeds=slots.visual_embeds,
            visual_mask=slots.visual_mask,
        )  # (B, S, H)
        results.append((output, step_counted(slots.counted, step)))
    return results


def step_loss(draft, output, target_features, counted, target_head):
    """Sums of the feature and token losses, agreements and slot count of one draft step's counted slots, or None."""
    predicted = output[counted].float()  # (N, H) counted slots only: the head's logits are large
    expected = target_features[counted].float()  # (N, H)
    if predicted.shape[0] == 0:
        return None
    feature_sum = F.smooth_l1_loss(predicted, expected, reduction="none").mean(dim=-1).sum()
    with torch.no_grad():
        target_probs = torch.softmax(draft.compute_logits(expected).float(), dim=-1)  # (N, V_draft)
    draft_logits = draft.compute_logits(predicted).float()  # (N, V_draft)
    token_sum = -(target_probs * torch.log_softmax(draft_logits, dim=-1)).sum()
    agreements = count_agreements(draft, draft_logits, target_probs, expected, target_head)
    return feature_sum, token_sum, agreements, predicted.shape[0]


def shift_right(values: torch.Tensor, by: int) -> torch.Tensor:
    """Move (B, S, ...) values `by` slots to the right along dim 1, filling the first slots with zeros (False)."""
    shifted = torch.zeros_like(values)
    if by < values.shape[1]:  # a shift past the last slot leaves only zeros
        shifted[:, by:] = values[:, : values.shape[1] - by]
    return shifted


def unrolled_attention(first_step: torch.Tensor, step: int) -> torch.Tensor:
    """Build the (B, 1, S, step * S) mask of draft step `step` over the keys of steps 1 .. step (module docstring).

    first_step: (B, 1, S, S) the first step's mask. Step `step`'s slot j attends as row a = j - step + 1 of it does (the
    anchor's causal, unpadded view) and, for each later step t, the single slot a + t - 1 of its chain.
    """
    length = first_step.shape[-1]
    blocks = [shift_right(first_step[:, 0], step - 1)[:, None]]  # row j takes the anchor's row
    ones = torch.ones(length, length, dtype=torch.bool, device=first_step.device)
    for later in range(2, step + 1):
        offset = step - later
        chain = ones.tril(-offset).triu(-offset)  # True at [j, j - offset] only, empty when offset >= length
        blocks.append(chain.expand_as(first_step))
    return torch.cat(blocks, dim=-1)


@torch.no_grad()
def count_agreements(
    draft, draft_logits: torch.Tensor, target_probs: torch.Tensor, expected: torch.Tensor, target_head
) -> int:
    """Count slots where the draft's top-1, as a target id, is the target's top-1 token.

    draft_logits, target_probs: (N, V_draft); expected: (N, H) the target features. With a reduced draft vocabulary
    and `target_head` (V, H) the target's top-1 is taken over its whole vocabulary.
    """
    draft_top = draft_logits.argmax(dim=-1)  # (N,) draft-vocabulary indices
    if draft.draft_to_target is None or target_head is None:
        return int((draft_top == target_probs.argmax(dim=-1)).sum())
    target_top = F.linear(expected.to(target_head.dtype), target_head).argmax(dim=-1)  # (N,) target ids
    return int((draft.to_target_ids(draft_top) == target_top).sum())
