"""Tiny stand-ins for the embedded default target's parts: a ChatML Llama LM and a DINOv2 encoder, random weights."""

from __future__ import annotations

import torch
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

from tiny_models import make_tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_language_model(seed: int = 0, tie: bool = True):
    """A 2-layer Llama with a ChatML tokenizer whose eos and pad are `<|im_end|>`, like SmolLM2's."""
    tokenizer = make_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_vision_model(seed: int = 0) -> Dinov2Model:
    """A 2-layer DINOv2 with patch 14, trained-size grid of 4 x 4 patches (56 px)."""
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        patch_size=14,
        image_size=56,
        layer_norm_eps=1e-6,
    )
    return Dinov2Model(config).eval()
