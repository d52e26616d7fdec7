"""Projector training on a tiny assembled target: labels, cached features, data order, checkpoint and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from msd.embedded import train_projector as training
from msd.embedded.assemble import assemble_llava
from msd.embedded.train_projector import (
    IGNORE_INDEX,
    ProjectorTraining,
    batch_indices,
    tokenize_batch,
    train_projector,
)
from msd.embedded.vqa_data import VQAExample, cached_vision_features
from msd.errors import MSDError
from tiny_embedded import tiny_language_model, tiny_vision_model
from tiny_models import random_image

EXAMPLES = [
    VQAExample("what shape is it?", "circle", 0),
    VQAExample("is it red?", "no", 1),
    VQAExample("what color is the shape?", "blue", 2),
    VQAExample("does the image contain a triangle?", "yes", 1),
]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    language_model, tokenizer = tiny_language_model()
    model, processor = assemble_llava(language_model, tokenizer, tiny_vision_model(), image_size=28)
    folder = tmp_path_factory.mktemp("target")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = tmp_path_factory.mktemp("images")
    paths = []
    for index in range(3):
        path = images / f"{index}.png"
        random_image(40, 40, seed=index).save(path)
        paths.append(path)
    return folder, model, processor, paths


@pytest.fixture()
def tiny_data(target, monkeypatch):
    paths = target[3]
    monkeypatch.setattr(training, "load_easy_vqa", lambda split, max_images=None: (EXAMPLES, paths))


def test_labels_cover_answer_and_end(target):
    _, model, processor, _ = target
    input_ids, attention_mask, labels = tokenize_batch(processor, EXAMPLES[:2], model.config.image_seq_length)
    tokenizer = processor.tokenizer
    for row, example in enumerate(EXAMPLES[:2]):
        labelled = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]) == example.answer
        assert int((input_ids[row] == model.config.image_token_id).sum()) == model.config.image_seq_length
    assert torch.all(labels[attention_mask == 0] == IGNORE_INDEX)


def test_cached_features_match_llava(target, tmp_path):
    _, model, processor, paths = target
    features = cached_vision_features(model, processor, paths, tmp_path / "features.safetensors")
    assert features.shape == (3, model.config.image_seq_length, model.config.vision_config.hidden_size)
    pixel_values = processor.image_processor([random_image(40, 40, seed=1)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output[0]
        projected = model.model.multi_modal_projector(features[1])
    assert torch.allclose(projected, expected, atol=1e-2)  # features are stored in float16


def test_feature_cache_reused_and_refreshed(target, tmp_path):
    _, model, processor, paths = target
    cache_file = tmp_path / "features.safetensors"
    first = cached_vision_features(model, processor, paths, cache_file)
    stamp = cache_file.stat().st_mtime_ns
    assert torch.equal(cached_vision_features(model, processor, paths, cache_file), first)
    assert cache_file.stat().st_mtime_ns == stamp
    assert cached_vision_features(model, processor, paths[:2], cache_file).shape[0] == 2


def test_batch_order_is_epoch_permutation():
    settings = ProjectorTraining(batch_size=2, seed=3)
    epoch = [index for step in range(5) for index in batch_indices(step, settings, 10)]
    assert sorted(epoch) == list(range(10))
    assert batch_indices(7, settings, 10) == batch_indices(7, settings, 10)
    next_epoch = [index for step in range(5, 10) for index in batch_indices(step, settings, 10)]
    assert sorted(next_epoch) == list(range(10))
    assert next_epoch != epoch


def test_resumed_run_matches_uninterrupted(target, tiny_data, tmp_path):
    folder = target[0]
    settings = ProjectorTraining(steps=4, batch_size=2, learning_rate=1e-2, warmup_steps=1)
    whole = train_projector(folder, tmp_path / "whole.safetensors", tmp_path / "run-a", settings)

    stopped = train_projector(folder, tmp_path / "split.safetensors", tmp_path / "run-b", settings, stop_after=2)
    assert stopped == tmp_path / "run-b" / "checkpoint"
    assert not (tmp_path / "split.safetensors").exists()
    split = train_projector(folder, tmp_path / "split.safetensors", tmp_path / "run-b", settings)

    expected, resumed = load_file(str(whole)), load_file(str(split))
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name


def test_training_changes_projector(target, tiny_data, tmp_path):
    folder, model, _, _ = target
    settings = ProjectorTraining(steps=2, batch_size=2, learning_rate=1e-2, warmup_steps=0)
    trained = load_file(str(train_projector(folder, tmp_path / "p.safetensors", tmp_path / "run", settings)))
    initial = model.model.multi_modal_projector.state_dict()
    assert not torch.allclose(trained["linear_2.weight"], initial["linear_2.weight"])


def test_resume_with_other_settings_raises(target, tiny_data, tmp_path):
    folder = target[0]
    settings = ProjectorTraining(steps=3, batch_size=2, warmup_steps=0)
    train_projector(folder, tmp_path / "p.safetensors", tmp_path / "run", settings, stop_after=1)
    with pytest.raises(MSDError, match="other settings|written with settings"):
        train_projector(folder, tmp_path / "p.safetensors", tmp_path / "run", ProjectorTraining(steps=3, batch_size=4))


@pytest.mark.parametrize(
    "settings",
    [
        ProjectorTraining(steps=0),
        ProjectorTraining(batch_size=0),
        ProjectorTraining(learning_rate=0.0),
        ProjectorTraining(max_images=0),
    ],
)
def test_bad_settings_raise(settings):
    with pytest.raises(MSDError):
        settings.check()
