"""Tiny randomly initialised LLaVA and Qwen2-VL targets built from real transformers classes, for tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few sentences, and the image processors are
configured inline. The Qwen2-VL processor class needs torchvision in transformers 5 (for its video processor), so the
Qwen2-VL inputs are assembled the way that processor does it: image processor output plus one `<|image_pad|>` per
merged patch.
"""

from __future__ import annotations

import numpy as np
import tokenizers
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is in this image? Describe the picture in detail, please.",
    "A cat sits on a red mat near the window while the sun sets.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and letters make words and sentences.",
]

VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

IMAGE_PATCH = 14


def make_tokenizer(special_tokens: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer; any text encodes, and the first ids are the special tokens."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 5, vocab_size=vocab_size, min_frequency=1, special_tokens=special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def make_word_tokenizer(special_tokens: list[str], words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words`: decoding and re-encoding generated text gives back the same ids.

    A byte-level tokenizer does not round-trip a random model's output (it emits partial UTF-8 sequences), which
    matters for tests that regenerate answers as text and tokenize them again.
    """
    vocab = {token: index for index, token in enumerate(special_tokens + sorted(set(words) - set(special_tokens)))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=special_tokens[0]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.add_special_tokens(special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def build_llava(
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    image_size: int = 56,
    layers: int = 2,
    words: list[str] | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    text_family: str = "llama",
):
    """A tiny LLaVA-1.5-shaped model and its processor. Each image becomes (image_size / 14)^2 visual tokens.

    With `words`, the tokenizer is word-level over those words plus the template's; otherwise byte-level BPE.
    text_family "qwen2" swaps the Llama language model for a Qwen2 one (biased query, key and value projections).
    """
    specials = ["<unk>", "<s>", "</s>", "<image>"]
    if words is None:
        tokenizer = make_tokenizer(specials)
    else:
        tokenizer = make_word_tokenizer(specials, words + ["USER:", "ASSISTANT:"])
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=IMAGE_PATCH,
        projection_dim=32,
    )
    text_config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text_family]
    text = text_config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(image_size // IMAGE_PATCH) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=IMAGE_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VICUNA_TEMPLATE,
    )
    return model, processor


def llava_inputs(processor, text: str, images: list[Image.Image]):
    """Processor inputs for a Vicuna-style prompt with one `<image>` per image in front of the text."""
    prompt = "USER: " + "<image>\n" * len(images) + text + " ASSISTANT:"
    return processor(images=images or None, text=prompt, return_tensors="pt")


class TinyQwen2VL:
    """A tiny Qwen2-VL (or, with version="2.5", Qwen2.5-VL) model with a tokenizer and image processor, and the
    input assembly of its processor."""

    SPECIALS = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]

    def __init__(
        self,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        layers: int = 2,
        max_pixels: int = 112 * 112,
        version: str = "2",
        hidden_size: int = 64,
        intermediate_size: int = 128,
    ):
        self.tokenizer = make_tokenizer(self.SPECIALS)
        self.tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
        ids = {token: self.tokenizer.convert_tokens_to_ids(token) for token in self.SPECIALS}
        torch.manual_seed(seed)
        half_head = hidden_size // 4 // 2  # rotary pairs per head (4 heads), split over time, height and width
        mrope_section = [half_head // 4, 3 * half_head // 8, 3 * half_head // 8]
        if version == "2":
            config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
            vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=4, mlp_ratio=2)
        else:
            config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=4,
                out_hidden_size=hidden_size,
                window_size=56,
                fullatt_block_indexes=[1],
            )
        config = config_class(
            text_config=dict(
                vocab_size=len(self.tokenizer),
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
                eos_token_id=ids["<|im_end|>"],
                bos_token_id=ids["<|im_start|>"],
            ),
            vision_config=dict(
                **vision,
                patch_size=IMAGE_PATCH,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
            ),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        self.model = model_class(config).to(dtype).eval()
        self.model.generation_config.eos_token_id = ids["<|im_end|>"]
        self.model.generation_config.pad_token_id = ids["<|endoftext|>"]
        self.image_processor = Qwen2VLImageProcessorPil(
            min_pixels=56 * 56, max_pixels=max_pixels, patch_size=IMAGE_PATCH, merge_size=2, temporal_patch_size=2
        )
        self.image_token_id = ids["<|image_pad|>"]

    def inputs(self, text: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """ChatML prompt ids with each image expanded to its merged-patch count, as Qwen2VLProcessor does."""
        batch = {}
        counts = []
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = pixels["pixel_values"]
            batch["image_grid_thw"] = pixels["image_grid_thw"]
            counts = [int(grid.prod()) // 4 for grid in pixels["image_grid_thw"]]
        vision = "".join("<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|>" for count in counts)
        prompt = f"<|im_start|>user\n{vision}{text}<|im_end|>\n<|im_start|>assistant\n"
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        batch["input_ids"] = input_ids
        batch["attention_mask"] = torch.ones_like(input_ids)
        batch["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        return batch
