"""Bad input gets an MSDError that names the value and the fix."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from msd.errors import MSDError
from msd.images import load_image
from msd.prompts import build_inputs, build_messages
from msd.targets import adapter_for, load_target
from tiny_models import random_image


def test_missing_image(tmp_path):
    with pytest.raises(MSDError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_image_path_is_directory(tmp_path):
    with pytest.raises(MSDError, match="not a file"):
        load_image(tmp_path)


def test_unsupported_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not an image")
    with pytest.raises(MSDError, match="unsupported or unreadable"):
        load_image(path)


def test_truncated_image(tmp_path):
    path = tmp_path / "photo.jpg"
    random_image(64, 64).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MSDError, match="corrupt image"):
        load_image(path)


def test_oversized_image(tmp_path, monkeypatch):
    # Pillow's decompression-bomb limit raises its own error class, which is not an OSError.
    path = tmp_path / "big.png"
    random_image(30, 20).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(MSDError, match="image too large"):
        load_image(path)


def test_16_bit_grayscale_keeps_brightness(tmp_path):
    # 16-bit samples are scaled to 8 bits, where Pillow's RGB conversion alone clips them to 255.
    path = tmp_path / "depth.png"
    samples = np.random.default_rng(0).integers(0, 65536, size=(20, 30), dtype=np.uint16)
    Image.fromarray(samples).save(path)
    pixels = np.asarray(load_image(path), dtype=np.float64)
    assert pixels.shape == (20, 30, 3)
    assert abs(pixels.mean() - samples.mean() / 257) < 1.0


def test_16_bit_big_endian_loads(tmp_path):
    # A big-endian 16-bit TIFF opens as I;16B, which Pillow's `point` does not take directly.
    path = tmp_path / "depth.tif"
    samples = np.random.default_rng(0).integers(0, 65536, size=(20, 30), dtype=np.uint16)
    Image.fromarray(samples.astype(">u2")).save(path)
    assert Image.open(path).mode == "I;16B"
    pixels = np.asarray(load_image(path), dtype=np.float64)
    assert abs(pixels.mean() - samples.mean() / 257) < 1.0


def test_valid_image_loads_rgb(tmp_path):
    path = tmp_path / "gray.png"
    random_image(30, 20).convert("L").save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (30, 20)


def test_placeholder_count_mismatch():
    with pytest.raises(MSDError, match="2 <image> placeholders but 1 image was given"):
        build_messages("compare <image> and <image>", 1)


def test_placeholders_interleave_images():
    content = build_messages("first <image> then <image> done", 2)[0]["content"]
    assert [item["type"] for item in content] == ["text", "image", "text", "image", "text"]


def test_no_placeholders_put_images_first():
    content = build_messages("describe", 2)[0]["content"]
    assert [item["type"] for item in content] == ["image", "image", "text"]


def test_processor_without_chat_template(llava_family):
    processor = llava_family.processor
    saved = processor.chat_template
    processor.chat_template = None
    try:
        with pytest.raises(MSDError, match="--raw-prompt"):
            build_inputs(processor, "hi", [])
    finally:
        processor.chat_template = saved


def test_prompt_longer_than_context(llava_family):
    inputs = llava_family.make_inputs("word " * 1100, [])
    assert inputs["input_ids"].shape[1] > llava_family.target.max_positions
    with pytest.raises(MSDError, match="context is 1024 tokens"):
        llava_family.target.prefill(inputs)


def test_image_tokens_without_images(llava_family):
    inputs = llava_family.make_inputs("hi", [random_image(60, 60)])
    del inputs["pixel_values"]
    with pytest.raises(MSDError, match="no images were given"):
        llava_family.target.prefill(inputs)


def test_image_token_count_mismatch(family):
    inputs = family.make_inputs("hi", [random_image(60, 60)])
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == family.target.image_token_id).nonzero()[0]] = 0  # drop one image token
    inputs["input_ids"] = ids
    with pytest.raises(MSDError, match="image tokens but the images produce"):
        family.target.prefill(inputs)


def test_batch_rejected(llava_family):
    inputs = llava_family.make_inputs("hi", [])
    inputs = {name: torch.cat([value, value]) for name, value in inputs.items()}
    with pytest.raises(MSDError, match="one prompt at a time"):
        llava_family.target.prefill(inputs)


def test_unknown_family_adapter():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(MSDError, match="unsupported target model family 'llama'"):
        adapter_for(model)


def test_unknown_family_folder(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "llama")
    with pytest.raises(MSDError, match="unsupported target model family 'llama'"):
        load_target(tmp_path / "llama")


def test_missing_target_folder(tmp_path):
    # An absolute path that does not exist is reported as a missing folder, not as an invalid Hub model id
    with pytest.raises(MSDError, match="target folder not found"):
        load_target(tmp_path / "missing")


def test_corrupt_target_config(tmp_path):
    # A damaged config.json gives the folder and what the folder must contain.
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text('{"model_type": "llava", ')
    with pytest.raises(MSDError, match="cannot load a model config .* contains the model's config.json"):
        load_target(tmp_path / "target")


def test_truncated_image_with_lenient_pillow(tmp_path, monkeypatch):
    # A library that enables Pillow's LOAD_TRUNCATED_IMAGES globally must not make a corrupt image pass.
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = tmp_path / "photo.jpg"
    random_image(64, 64).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(MSDError, match="corrupt image"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the setting is restored
