"""Turning a user prompt and image files into the processor inputs of one request."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from msd.errors import MSDError

#: Marker for an image's place in a user prompt. Without markers all images go before the text.
IMAGE_PLACEHOLDER = "<image>"


def build_messages(prompt: str, image_count: int) -> list[dict]:
    """Build one user message in the chat-template content format, with images at the `<image>` markers."""
    markers = prompt.count(IMAGE_PLACEHOLDER)
    if markers and markers != image_count:
        images = "1 image was" if image_count == 1 else f"{image_count} images were"
        placeholders = "placeholder" if markers == 1 else "placeholders"
        raise MSDError(
            f"the prompt has {markers} {IMAGE_PLACEHOLDER} {placeholders} but {images} given. "
            f"Use one {IMAGE_PLACEHOLDER} per image, or none to put all images before the text."
        )
    content: list[dict] = []
    if not markers:
        content += [{"type": "image"} for _ in range(image_count)]
        content.append({"type": "text", "text": prompt})
    else:
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        for index, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece})
            if index < len(pieces) - 1:
                content.append({"type": "image"})
    return [{"role": "user", "content": content}]


def build_inputs(processor, prompt: str, images: Sequence[Image.Image], raw_prompt: bool = False):
    """Processor inputs (batch 1, PyTorch tensors) for a prompt and its images.

    With raw_prompt the text goes to the processor unchanged, so it must already contain the model's own image token
    once per image. Otherwise the processor's chat template wraps it as one user turn with a generation prompt.
    """
    if raw_prompt:
        text = prompt
    else:
        if getattr(processor, "chat_template", None) is None:
            raise MSDError(
                "the target's processor has no chat template. Pass the fully formatted prompt with --raw-prompt."
            )
        text = processor.apply_chat_template(
            build_messages(prompt, len(images)), add_generation_prompt=True, tokenize=False
        )
    try:
        return processor(images=list(images) or None, text=text, return_tensors="pt")
    except ValueError as error:
        raise MSDError(f"the processor rejected the prompt and images: {error}") from None
