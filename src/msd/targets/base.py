"""The target adapter: one interface over transformers' own vision-language model classes.

An adapter drives a target model through the three calls speculative decoding needs, on one sequence (batch 1):

- `prefill`: the prompt with its images, filling a fresh KV cache. It returns the last-layer hidden states (after the
  final norm), the logits at the last position, the input embeddings the language model received (visual positions
  hold the projected visual features) and which positions are visual.
- `forward_tree`: one forward over a tree of candidate tokens appended to the cache. Each node attends to the whole
  cached prefix, its ancestors and itself, and sits at position `next position + node depth`.
- `keep_accepted`: drop the cache entries of the tree nodes that were not accepted.

Family specifics (how images are embedded, how positions are numbered) live in the subclasses. The language model is
called directly with `inputs_embeds`, so the adapter gets the merged embeddings without running the vision tower twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from msd.errors import MSDError
from msd.targets.batch_invariant import key_layout


@dataclass
class PrefillOutput:
    """Target outputs over the prompt. L is the prompt length, H the hidden size, P the number of position rows."""

    input_ids: torch.Tensor  # (L,) prompt token ids
    hidden_states: torch.Tensor  # (L, H) last-layer hidden states after the final norm
    inputs_embeds: torch.Tensor  # (L, H) embeddings the language model received
    visual_mask: torch.Tensor  # (L,) bool, True at image-token positions
    positions: torch.Tensor  # (P, L) position ids; P = 1 for 1-D rotary, 3 for multimodal rotary
    logits: torch.Tensor  # (V,) logits at the last prompt position


@dataclass
class TargetState:
    """The target's KV cache for one sequence and how positions continue after it."""

    cache: DynamicCache
    length: int  # number of tokens in the cache
    position_offset: int = 0  # position id of cache index i is i + position_offset (Qwen2-VL's rope delta)
    extras: dict = field(default_factory=dict)

    @property
    def next_position(self) -> int:
        """Position id of the next token appended to the cache."""
        return self.length + self.position_offset


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer's keys and values."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)  # transformers 5 takes the number of positions to drop, as a negative count


class TargetAdapter(ABC):
    """Speculative-decoding access to one vision-language model (see the module docstring)."""

    #: transformers `model_type` values this adapter serves
    model_types: tuple[str, ...] = ()
    #: number of position-id rows the language model takes
    position_rows: int = 1
    #: largest tree whose verification stays exact (batch-invariant kernels); None when any size is fine
    max_tree_tokens: int | None = None

    def __init__(self, model: PreTrainedModel, processor=None):
        self.model = model.eval()
        self.processor = processor
        self.config = model.config
        self.text_config = model.config.get_text_config()

    # -- model parts shared with the draft ------------------------------------------------------------

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, final norm) without the LM head."""
        return self.model.model.language_model

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def max_positions(self) -> int:
        """Maximum sequence length of the language model (its `max_position_embeddings`)."""
        return self.text_config.max_position_embeddings

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from the model's generation config (falling back to its text config)."""
        generation_config = getattr(self.model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.text_config, "eos_token_id", None)
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]

    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Token id of the placeholder that the processor repeats once per visual token."""

    # -- family specifics -----------------------------------------------------------------------------

    @abstractmethod
    def embed_inputs(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompt with its images. Returns inputs_embeds (1, L, H) and the visual mask (L,)."""

    @abstractmethod
    def prompt_positions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Position ids of the prompt, shape (P, L), and the offset that continues them after the prompt."""

    def format_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Turn (P, n) position ids into the shape the language model takes."""
        return positions  # (1, n) for 1-D rotary

    # -- the three calls ------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, inputs: Mapping[str, torch.Tensor]) -> tuple[PrefillOutput, TargetState]:
        """Run the prompt with its images through the target and start a KV cache.

        `inputs` is what the model's processor returns for one prompt (`input_ids` of shape (1, L), pixel values
        and the family's image metadata).
        """
        inputs = {name: value.to(self.device) if torch.is_tensor(value) else value for name, value in inputs.items()}
        input_ids = inputs["input_ids"]
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise MSDError(f"msd decodes one prompt at a time; got input_ids of shape {tuple(input_ids.shape)}.")
        length = input_ids.shape[1]
        if length >= self.max_positions:
            raise MSDError(
                f"the prompt is {length} tokens long but the target's context is {self.max_positions} tokens. "
                "Shorten the prompt or use fewer or smaller images."
            )

        inputs_embeds, visual_mask = self.embed_inputs(inputs)
        positions, offset = self.prompt_positions(inputs)
        cache = DynamicCache(config=self.text_config)
        output = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=self.format_positions(positions),
            cache=cache,
            use_cache=True,
        )
        hidden = output.last_hidden_state[0]  # (L, H), after the final norm
        logits = self.lm_head(hidden[-1:]).float()[0]  # (V,)
        prefill = PrefillOutput(
            input_ids=input_ids[0],
            hidden_states=hidden,
            inputs_embeds=inputs_embeds[0],
            visual_mask=visual_mask,
            positions=positions,
            logits=logits,
        )
        return prefill, TargetState(cache=cache, length=length, position_offset=offset)

    @torch.no_grad()
    def forward_tree(
        self,
        state: TargetState,
        tokens: torch.Tensor,
        depths: torch.Tensor,
        ancestor_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a tree of n candidate tokens in one forward. The cache grows by n entries.

        tokens: (n,) token ids; depths: (n,) depth below the tree root (the root is 0);
        ancestor_mask: (n, n) bool, [i, j] True when node j is node i or one of its ancestors.
        Returns logits (n, V) in the target's dtype and hidden states (n, H) after the final norm. The logits stay
        unconverted because a walk reads only a few rows (`msd.decoding.verify.walk_tree` converts those).
        """
        n = tokens.shape[0]
        tokens = tokens.to(self.device)
        positions = (state.next_position + depths.to(self.device)).view(1, n).expand(self.position_rows, n)

        # Additive mask over [cache | tree]: 0 where attention is allowed, the dtype's minimum elsewhere.
        allowed = torch.ones(n, state.length + n, dtype=torch.bool, device=self.device)
        allowed[:, state.length :] = ancestor_mask.to(self.device)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)

        extra = {}
        if self.max_tree_tokens is not None:  # batch-invariant attention: lay out each row's keys once for all layers
            extra["key_layout"] = key_layout(ancestor_mask.to(self.device), state.length, self.dtype)
        output = self.language_model(
            inputs_embeds=self.embed_tokens(tokens)[None],
            position_ids=self.format_positions(positions),
            attention_mask=mask[None, None],  # (1, 1, n, length + n)
            cache=state.cache,
            use_cache=True,
            **extra,
        )
        state.length += n
        hidden = output.last_hidden_state[0]  # (n, H)
        return self.lm_head(hidden), hidden

    def keep_accepted(self, state: TargetState, tree_size: int, accepted: torch.Tensor) -> None:
        """Keep only the accepted nodes of the last tree in the cache, in path order.

        tree_size: number of nodes the last `forward_tree` appended; accepted: (k,) their indices, root first.
        """
        prefix = state.length - tree_size
        count = accepted.shape[0]
        accepted = accepted.to(self.device)
        if not torch.equal(accepted, torch.arange(count, device=self.device)):
            # Move the accepted entries to the front of the tree's slots. Indexing copies before the assignment
            # writes, so overlapping source and destination slots are safe.
            moved = prefix + accepted
            for layer in state.cache.layers:
                layer.keys[:, :, prefix : prefix + count] = layer.keys[:, :, moved]
                layer.values[:, :, prefix : prefix + count] = layer.values[:, :, moved]
        truncate_cache(state.cache, prefix + count)
        state.length = prefix + count

    def generated_positions(self, state: TargetState, count: int) -> torch.Tensor:
        """Position ids (P, count) of the next `count` tokens appended to the cache."""
        positions = torch.arange(state.next_position, state.next_position + count, device=self.device)
        return positions.view(1, count).expand(self.position_rows, count)

    def check_image_tokens(self, input_ids: torch.Tensor, feature_count: int) -> None:
        """Raise MSDError when the prompt's image tokens do not match the number of visual features."""
        token_count = int((input_ids == self.image_token_id).sum())
        if token_count != feature_count:
            raise MSDError(
                f"the prompt has {token_count} image tokens but the images produce {feature_count} visual features. "
                "Build the prompt with the model's processor from a text holding one image placeholder per image."
            )
