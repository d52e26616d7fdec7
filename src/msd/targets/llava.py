"""LLaVA-1.5 targets (llava-hf checkpoints) through transformers' `LlavaForConditionalGeneration`.

NOTE: LLaVA-1.6 (`llava_next`) packs each image's tiles with a newline embedding, so its visual features need that
packing here before it can be added to `model_types`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from msd.errors import MSDError
from msd.targets.base import TargetAdapter


class LlavaAdapter(TargetAdapter):
    """LLaVA: a vision tower and projector feed a decoder with ordinary 1-D rotary positions."""

    model_types = ("llava",)
    position_rows = 1

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def embed_inputs(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
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
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_sizes=inputs.get("image_sizes"),
            return_dict=True,
        ).pooler_output
        features = torch.cat(list(features), dim=0).to(inputs_embeds.dtype)  # (visual tokens, H)
        self.check_image_tokens(input_ids, features.shape[0])
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[0, visual_mask] = features
        return inputs_embeds, visual_mask

    def prompt_positions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        length = inputs["input_ids"].shape[1]
        return torch.arange(length, device=self.device).view(1, length), 0
