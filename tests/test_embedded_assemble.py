"""The default target's assembly on tiny random parts: weights, vocabulary, chat template, processor, loading."""

from __future__ import annotations

import io

import pytest
import torch

from msd.embedded.assemble import (
    IMAGE_TOKEN,
    assemble_llava,
    grow_rows,
    image_tokens_per_side,
    load_projector_state,
    multimodal_chat_template,
)
from msd.errors import MSDError
from msd.prompts import build_inputs
from msd.targets import load_target
from tiny_embedded import CHATML_TEMPLATE, tiny_language_model, tiny_vision_model
from tiny_models import random_image


@pytest.fixture(scope="module")
def parts():
    language_model, tokenizer = tiny_language_model()
    vision_model = tiny_vision_model()
    original_vocab = len(tokenizer)
    model, processor = assemble_llava(language_model, tokenizer, vision_model, image_size=56)
    return language_model, vision_model, original_vocab, model, processor


def test_image_token_added(parts):
    _, _, original_vocab, model, processor = parts
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_token_id == original_vocab
    assert model.config.image_token_id == image_token_id
    assert model.config.text_config.vocab_size == original_vocab + 1


def test_language_weights_copied(parts):
    language_model, _, original_vocab, model, _ = parts
    embeddings = model.get_input_embeddings().weight
    source = language_model.get_input_embeddings().weight
    assert torch.equal(embeddings[:original_vocab], source)
    assert torch.allclose(embeddings[original_vocab], source.mean(dim=0))
    assert model.lm_head.weight.data_ptr() == embeddings.data_ptr()
    ids = torch.tensor([[1, 5, 9, 17, 40]])
    with torch.no_grad():
        expected = language_model(input_ids=ids).logits
        logits = model(input_ids=ids).logits
    assert torch.allclose(logits[..., :original_vocab], expected, atol=1e-5)


def test_vision_weights_copied(parts):
    _, vision_model, _, model, _ = parts
    tower = model.model.vision_tower.state_dict()
    for name, tensor in vision_model.state_dict().items():
        assert torch.equal(tower[name], tensor), name


def test_processor_expands_image(parts):
    _, _, _, model, processor = parts
    inputs = build_inputs(processor, "What is this?", [random_image(80, 60)])
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == model.config.image_seq_length == (56 // 14) ** 2
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 56, 56)


def test_untied_head_grows(parts):
    language_model, tokenizer = tiny_language_model(tie=False)
    original_vocab = len(tokenizer)
    model, _ = assemble_llava(language_model, tokenizer, tiny_vision_model(), image_size=28)
    head = model.lm_head.weight
    assert head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(head[:original_vocab], language_model.lm_head.weight)
    assert model.config.image_seq_length == 4


def test_saved_folder_loads_as_target(parts, tmp_path):
    _, _, _, model, processor = parts
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    target = load_target(tmp_path, dtype="float32")
    assert target.image_token_id == model.config.image_token_id
    assert target.eos_token_ids == [processor.tokenizer.eos_token_id]
    inputs = build_inputs(target.processor, "Describe <image> please.", [random_image(64, 64, seed=3)])
    output, _ = target.prefill(inputs)
    assert int(output.visual_mask.sum()) == model.config.image_seq_length
    with torch.no_grad():
        expected = model(**inputs).logits[0, -1]
    assert torch.allclose(output.logits, expected, atol=1e-4)


def test_chat_template_keeps_text_messages():
    language_model, tokenizer = tiny_language_model()
    messages = [{"role": "user", "content": "Hello there"}]
    tokenizer_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = multimodal_chat_template(CHATML_TEMPLATE)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tokenizer_text


def test_chat_template_renders_content_lists():
    _, tokenizer = tiny_language_model()
    tokenizer.chat_template = multimodal_chat_template(CHATML_TEMPLATE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n<image>\nWhat shape?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_missing_chat_template_raises():
    with pytest.raises(MSDError, match="no chat template"):
        multimodal_chat_template(None)


@pytest.mark.parametrize("size", [0, 13, 50, 113])
def test_bad_image_size_raises(size):
    with pytest.raises(MSDError, match=f"{size} px"):
        image_tokens_per_side(size, 14)


def test_image_size_tokens():
    assert image_tokens_per_side(112, 14) == 8
    assert image_tokens_per_side(224, 14) == 16


def test_projector_state_loads(parts):
    _, _, _, model, _ = parts
    projector = model.model.multi_modal_projector
    state = {name: torch.full_like(tensor, 0.5) for name, tensor in projector.state_dict().items()}
    load_projector_state(model, state)
    assert all(torch.all(tensor == 0.5) for tensor in projector.state_dict().values())


def test_projector_state_wrong_shape_raises(parts):
    _, _, _, model, _ = parts
    state = {name: torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:]) for name, tensor in model.model.multi_modal_projector.state_dict().items()}
    with pytest.raises(MSDError, match="do not fit"):
        load_projector_state(model, state)


def test_grow_rows_appends_mean():
    matrix = torch.arange(6.0).view(3, 2)
    grown = grow_rows(matrix, 5)
    assert grown.shape == (5, 2)
    assert torch.equal(grown[3], torch.tensor([2.0, 3.0]))
    assert torch.equal(grown[4], torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError):
        grow_rows(matrix, 2)


def test_gguf_progress_hidden_when_quiet():
    # With transformers' progress bars off (msd -q), the GGUF reader's tqdm starts disabled inside the context only.
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as transformers_logging

    from msd.embedded.language import quiet_gguf_progress

    transformers_logging.disable_progress_bar()
    try:
        with quiet_gguf_progress():
            assert gguf_reader.tqdm(range(2)).disable
    finally:
        transformers_logging.enable_progress_bar()
    bar = gguf_reader.tqdm(range(2), file=io.StringIO())
    assert not bar.disable
    with quiet_gguf_progress():  # progress bars on: nothing replaced
        assert gguf_reader.tqdm is type(bar)
