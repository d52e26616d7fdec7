"""Joining a vision encoder and a causal LM into a `LlavaForConditionalGeneration` with its `LlavaProcessor`.

The result is a stock transformers LLaVA model: `<image>` expands to one token per image patch (the CLS token is
dropped, LLaVA-1.5's "default" feature selection), the vision encoder's last hidden layer goes through a two-layer
GELU MLP projector into the LM's embedding space, and the chat template is the LM's own, extended to accept the
`[{"type": "image"}, {"type": "text", ...}]` content lists that processors pass.
"""

from __future__ import annotations

import copy

import torch
from PIL import Image
from transformers import (
    AddedToken,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from msd.errors import MSDError

IMAGE_TOKEN = "<image>"
# The DINOv2 preprocessing: RGB, bicubic resize to a square, ImageNet mean and standard deviation.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Jinja prelude that rewrites content lists into strings (image items become the image token and a newline), so a
# template written for plain-text messages also renders multimodal ones. The top-level `set` shadows `messages`
# for the template that follows.
CONTENT_LIST_PRELUDE = (
    "{%- set flattened = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set flattened.messages = flattened.messages + [message] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set text.value = text.value + IMAGE_TOKEN_LITERAL + '\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set text.value = text.value + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flattened.messages = flattened.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = flattened.messages -%}"
)


def multimodal_chat_template(text_template: str | None, image_token: str = IMAGE_TOKEN) -> str:
    """Extend a text-only chat template so messages may carry image items.

    Raises MSDError when the LM has no chat template.
    """
    if not text_template:
        raise MSDError("the language model's tokenizer has no chat template, so the VLM cannot format prompts.")
    return CONTENT_LIST_PRELUDE.replace("IMAGE_TOKEN_LITERAL", repr(image_token)) + text_template


def image_tokens_per_side(image_size: int, patch_size: int) -> int:
    """Patches along one side of a square image; raises MSDError unless image_size is a positive multiple."""
    if image_size < patch_size or image_size % patch_size:
        raise MSDError(
            f"image size {image_size} px is not a positive multiple of the vision encoder's patch size "
            f"{patch_size} px. Use for example {max(1, round(image_size / patch_size)) * patch_size}."
        )
    return image_size // patch_size


def assemble_llava(
    language_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    vision_model: PreTrainedModel,
    image_size: int,
    projector_state: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a LLaVA model and processor around pretrained LM and vision weights.

    `tokenizer` gains the `<image>` token (it is modified in place). The new embedding row is the mean of the LM's
    embeddings, so with tied embeddings the LM head never favours `<image>`. `projector_state` contains
    `linear_1.*`/`linear_2.*` tensors of `LlavaMultiModalProjector`; without it the projector keeps the
    initialisation drawn with `seed`. Images are resized to `image_size` square and give (image_size / patch)^2
    visual tokens each.
    """
    patch_size = vision_model.config.patch_size
    tokens_per_image = image_tokens_per_side(image_size, patch_size) ** 2

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = copy.deepcopy(language_model.config)
    text_config.vocab_size = len(tokenizer)

    config = LlavaConfig(
        vision_config=vision_model.config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=tokens_per_image,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(language_model.dtype).eval()
    copy_language_weights(model, language_model, len(tokenizer))
    model.model.vision_tower.load_state_dict(vision_model.state_dict(), strict=False)
    if projector_state is not None:
        load_projector_state(model, projector_state)
    model.generation_config = copy.deepcopy(language_model.generation_config)

    image_processor = BitImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=multimodal_chat_template(tokenizer.chat_template),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, which "default" selection drops again
    )
    return model, processor


def copy_language_weights(model: LlavaForConditionalGeneration, language_model: PreTrainedModel, vocab_size: int):
    """Copy the decoder and LM head into the LLaVA model, growing the vocabulary to `vocab_size` rows.

    New rows are the mean of the existing rows (embedding and, when untied, LM head alike).
    """
    state = dict(language_model.model.state_dict())
    state["embed_tokens.weight"] = grow_rows(state["embed_tokens.weight"], vocab_size)  # (V', H)
    model.model.language_model.load_state_dict(state, strict=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    else:
        head = grow_rows(language_model.get_output_embeddings().weight.detach(), vocab_size)
        model.lm_head.weight.data.copy_(head)


def grow_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """(V, H) -> (rows, H), appending copies of the mean row."""
    extra = rows - matrix.shape[0]
    if extra < 0:
        raise ValueError(f"cannot shrink a {matrix.shape[0]}-row matrix to {rows} rows")
    mean = matrix.mean(dim=0, keepdim=True)
    return torch.cat([matrix, mean.expand(extra, -1)], dim=0)


def load_projector_state(model: LlavaForConditionalGeneration, state: dict[str, torch.Tensor]) -> None:
    """Load projector weights, raising MSDError when their names or shapes do not fit this model."""
    projector = model.model.multi_modal_projector
    expected = {name: tuple(tensor.shape) for name, tensor in projector.state_dict().items()}
    given = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if expected != given:
        raise MSDError(
            f"the projector weights do not fit this model: expected {expected}, got {given}. "
            "Retrain the projector for this vision encoder and language model."
        )
    projector.load_state_dict({name: tensor.to(model.dtype) for name, tensor in state.items()})
