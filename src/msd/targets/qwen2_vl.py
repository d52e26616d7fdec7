"""Qwen2-VL and Qwen2.5-VL targets, with their 3-D multimodal rotary positions (M-RoPE).

Qwen2-VL numbers each position with three ids (temporal, height, width). Text tokens carry the same id in all three
rows. Image tokens carry their grid coordinates, and text after an image continues from the maximum id used so far.
After the prompt, the position of cache index i is `i + rope_delta`, where the model's `get_rope_index` returns
rope_delta (0 for text-only prompts, negative after images, since an image spans fewer ids than tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from msd.errors import MSDError
from msd.targets.base import TargetAdapter


class Qwen2VLAdapter(TargetAdapter):
    """Qwen2-VL / Qwen2.5-VL: the vision tower's merger output replaces the image-pad tokens."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    position_rows = 3

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def embed_inputs(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.get("pixel_values_videos") is not None:
            raise MSDError("video inputs are not supported yet; pass images only.")
        input_ids = inputs["input_ids"]
        inputs_embeds = self.embed_tokens(input_ids)  # (1, L, H)
        visual_mask = input_ids[0] == self.image_token_id  # (L,)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            if visual_mask.any():
                raise MSDError("the prompt contains image tokens but no images were given.")
            return inputs_embeds, visual_mask

        features = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            image_grid_thw=inputs["image_grid_thw"],
            return_dict=True,
        ).pooler_output
        features = torch.cat(list(features), dim=0).to(inputs_embeds.dtype)  # (visual tokens, H)
        self.check_image_tokens(input_ids, features.shape[0])
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[0, visual_mask] = features
        return inputs_embeds, visual_mask

    def prompt_positions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        input_ids = inputs["input_ids"]
        length = input_ids.shape[1]
        grid = inputs.get("image_grid_thw")
        if grid is None:
            positions = torch.arange(length, device=self.device).view(1, length).expand(3, length)
            return positions, 0

        token_types = inputs.get("mm_token_type_ids")
        if token_types is None:  # processors before transformers 5 did not return it
            token_types = (input_ids == self.image_token_id).int()
        positions, rope_deltas = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=grid,
            attention_mask=inputs.get("attention_mask"),
        )
        return positions[:, 0], int(rope_deltas.view(-1)[0])  # (3, L) and the delta for the only sequence

    def format_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[:, None]  # (3, 1, n): three rows, batch 1
