"""`prepare_features`: stored records equal a direct target forward with the images; bad rows are counted."""

from __future__ import annotations

import json
import os
import stat

from dataclasses import replace

import pytest
import torch
from data_helpers import TinyQwen2VLProcessor, chat, write_images, write_jsonl
from safetensors.torch import load_file
from tiny_models import TinyQwen2VL, build_llava

from msd.data.conversations import ConversationEncoder, SkipReason, load_images, parse_row
from msd.data.dataset import FeatureDataset
from msd.data.prepare import FeaturePreparer, PrepareSettings, prepare_features, sample_bytes
from msd.data.regenerate import AnswerRegenerator
from msd.data.rows import Part, open_rows
from msd.errors import MSDError
from msd.targets import adapter_for


@pytest.fixture(scope="module")
def llava_target():
    model, processor = build_llava(seed=0)
    return adapter_for(model, processor)


@pytest.fixture(scope="module")
def qwen_target():
    tiny = TinyQwen2VL(seed=0)
    return adapter_for(tiny.model, TinyQwen2VLProcessor(tiny))


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    write_images(root, {"a.png": (60, 50), "b.png": (90, 60), "c.png": (56, 56)})
    return root


ROWS = [
    chat("<image>\nWhat is in this image?", "A cat sits on a red mat.", image="a.png", row_id="one"),
    chat("What are numbers?", "Numbers 0 1 2 make words.", "And letters?", "Letters make sentences.", row_id="two"),
    chat("Compare <image> with <image>.", "The quick brown fox.", image=["b.png", "c.png"], row_id="three"),
]


def stored_samples(folder) -> list[dict]:
    manifest = [json.loads(line) for line in (folder / "part-00000-of-00001.manifest.jsonl").read_text().splitlines()]
    samples = []
    for entry in manifest:
        tensors = load_file(folder / entry["shard"])
        samples.append({name.split("/")[1]: t for name, t in tensors.items() if name.startswith(entry["key"] + "/")})
    return samples


def check_against_direct_forward(target, rows, folder, image_root):
    """Compare every stored sample with the HF model's own forward over the same inputs, images included."""
    encoder = ConversationEncoder(target.processor, target.image_token_id, 1000)
    for index, (row, stored) in enumerate(zip(rows, stored_samples(folder))):
        conversation = parse_row(row, index)
        images = load_images(conversation, image_root)
        sample = encoder.encode(conversation, images)
        inputs = sample.inputs
        with torch.no_grad():
            direct = target.model.model(**inputs).last_hidden_state[0]  # (T, H), after the final norm
        input_ids = inputs["input_ids"][0]
        visual = input_ids == target.image_token_id

        assert torch.equal(stored["input_ids"], input_ids.to(torch.int32))
        assert stored["hidden_states"].dtype == torch.float16
        torch.testing.assert_close(stored["hidden_states"].double(), direct, rtol=2e-3, atol=2e-3)
        assert torch.equal(stored["visual_mask"].bool(), visual)
        assert torch.equal(stored["loss_mask"].bool(), sample.loss_mask)
        assert stored["visual_embeds"].shape == (int(visual.sum()), target.hidden_size)
        if images:
            with torch.no_grad():
                embeds = target.model.model.get_input_embeddings()(inputs["input_ids"])
                features = target.embed_inputs(inputs)[0][0]
            torch.testing.assert_close(stored["visual_embeds"].double(), features[visual], rtol=2e-3, atol=2e-3)
            assert not torch.allclose(features[visual], embeds[0][visual])
        yield stored, inputs, direct


def test_llava_records_match_direct_forward(llava_target, image_root, tmp_path):
    settings = PrepareSettings(max_length=1000, output=tmp_path / "out", kind="llava_v15_v", store_dtype="float16", image_root=image_root)
    summary = prepare_features(llava_target, ROWS, settings)
    assert summary.stored == 3
    assert summary.skipped == {}
    for stored, _, _ in check_against_direct_forward(llava_target, ROWS, settings.output, image_root):
        assert "position_ids" not in stored  # 1-D positions are rebuilt as arange(T)
    assert stored_samples(settings.output)[2]["visual_mask"].sum() == 2 * llava_target.config.image_seq_length


def test_qwen2_vl_records_use_the_image(qwen_target, image_root, tmp_path):
    settings = PrepareSettings(max_length=1000, output=tmp_path / "out", kind="qwen2_vl_v", store_dtype="float16", image_root=image_root)
    summary = prepare_features(qwen_target, ROWS, settings)
    assert summary.stored == 3
    for stored, inputs, direct in check_against_direct_forward(qwen_target, ROWS, settings.output, image_root):
        positions, _ = qwen_target.prompt_positions(inputs)
        assert torch.equal(stored["position_ids"], positions.to(torch.int32))
        if "pixel_values" in inputs:
            assert positions[1:].ne(positions[0]).any()  # image tokens carry 2-D grid positions
            text_only = {"input_ids": inputs["input_ids"].where(inputs["input_ids"] != qwen_target.image_token_id, 0)}
            with torch.no_grad():
                blind = qwen_target.model.model(**text_only).last_hidden_state[0]
            # features computed without the image (the research code's bug) differ from the stored ones
            assert not torch.allclose(stored["hidden_states"].double(), blind, rtol=2e-3, atol=2e-3)


def test_card_and_dataset(qwen_target, image_root, tmp_path):
    settings = PrepareSettings(max_length=1000, output=tmp_path / "out", kind="qwen2_vl_v", image_root=image_root, shard_size=2)
    prepare_features(qwen_target, ROWS, settings, source="rows.jsonl")
    card = json.loads((settings.output / "dataset_card.json").read_text())
    assert card["settings"]["target_model_type"] == "qwen2_vl"
    assert card["settings"]["hidden_size"] == qwen_target.hidden_size
    assert card["settings"]["vocab_size"] == qwen_target.vocab_size
    assert card["settings"]["kind"] == "vision"
    assert card["settings"]["kind_name"] == "qwen2_vl_v"
    assert card["settings"]["dtype"] == "bfloat16"
    assert card["counts"]["samples"] == 3
    assert card["counts"]["shards"] == 2
    assert card["size_bytes"] > 0

    dataset = FeatureDataset(settings.output)
    assert len(dataset) == 3
    assert [entry["id"] for entry in dataset.entries] == ["one", "two", "three"]
    assert dataset[0]["hidden_states"].dtype == torch.bfloat16
    assert dataset[0]["position_ids"].shape == (3, dataset.lengths[0])


def test_bad_rows_skipped_and_counted(llava_target, image_root, tmp_path):
    (image_root / "broken.png").write_bytes(b"\x89PNG but not really")
    rows_path = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            ROWS[0],
            chat("Q", "A", image="nowhere.png"),
            chat("Q", "A", image="broken.png"),
            chat("Describe. " * 300, "Too long."),
            chat("Only a question"),
            '{"id": "cut", "conversations": [',
            ROWS[1],
        ],
    )
    settings = PrepareSettings(output=tmp_path / "out", kind="vision", image_root=image_root, max_length=300)
    summary = prepare_features(llava_target, open_rows(rows_path), settings)
    assert summary.stored == 2
    assert summary.skipped == {
        SkipReason.MISSING_IMAGE: 1,
        SkipReason.UNREADABLE_IMAGE: 1,
        SkipReason.TOO_LONG: 1,
        SkipReason.NO_ASSISTANT_TURN: 1,
        SkipReason.MALFORMED_JSON: 1,
    }
    card = json.loads((settings.output / "dataset_card.json").read_text())
    assert card["counts"]["skipped"][SkipReason.MALFORMED_JSON] == 1


def test_card_counts_add_up_over_shards(llava_target, image_root, tmp_path):
    # With one sample per shard, skipped rows and token counts are committed with several shards. The card's totals
    # must add every commit's counts, not keep the last one.
    rows = [ROWS[0], chat("Q", "A", image="nowhere.png"), ROWS[1], chat("Q", "A", image="gone.png"), ROWS[2]]
    settings = PrepareSettings(output=tmp_path / "out", kind="vision", image_root=image_root, max_length=1000,
                               shard_size=1)
    summary = prepare_features(llava_target, rows, settings)
    assert summary.stored == 3
    assert summary.skipped == {SkipReason.MISSING_IMAGE: 2}

    card = json.loads((settings.output / "dataset_card.json").read_text())
    manifest = [json.loads(line) for line in (settings.output / "part-00000-of-00001.manifest.jsonl").open()]
    assert card["counts"]["shards"] == 3
    assert card["counts"]["skipped"] == {SkipReason.MISSING_IMAGE: 2}
    assert card["counts"]["tokens"] == sum(entry["length"] for entry in manifest)
    assert card["counts"]["visual_tokens"] == sum(entry["visual_tokens"] for entry in manifest)
    assert card["counts"]["loss_tokens"] == sum(entry["loss_tokens"] for entry in manifest)


def test_text_kind_skips_image_rows(llava_target, image_root, tmp_path):
    settings = PrepareSettings(max_length=1000, output=tmp_path / "out", kind="llava_v15_t", image_root=image_root)
    summary = prepare_features(llava_target, ROWS, settings)
    assert summary.stored == 1
    assert summary.skipped == {SkipReason.IMAGE_IN_TEXT_SET: 2}


def test_changed_settings_rejected(llava_target, image_root, tmp_path):
    prepare_features(llava_target, ROWS[1:2], PrepareSettings(max_length=1000, output=tmp_path / "out", kind="text"))
    with pytest.raises(MSDError, match="max_length"):
        prepare_features(llava_target, ROWS[1:2], PrepareSettings(output=tmp_path / "out", kind="text", max_length=99))


def test_research_kind_names(llava_target, tmp_path, caplog):
    # A research kind name resumes a run started with the plain kind it stands for. A name made for another target
    # family warns.
    settings = PrepareSettings(max_length=1000, output=tmp_path / "out", kind="text")
    prepare_features(llava_target, ROWS[1:2], settings)
    with caplog.at_level("WARNING"):
        assert prepare_features(llava_target, ROWS[1:2], replace(settings, kind="llava_v15_t")).stored == 1
    assert "research pipeline's features" not in caplog.text
    with caplog.at_level("WARNING"):
        prepare_features(llava_target, ROWS[1:2], replace(settings, output=tmp_path / "qwen", kind="qwen2_vl_t"))
    assert "features of a qwen2_vl or qwen2_5_vl target, but this target is a llava model" in caplog.text


def test_rejects_bad_settings(llava_target, tmp_path):
    with pytest.raises(MSDError, match="kind"):
        prepare_features(llava_target, ROWS, PrepareSettings(max_length=1000, output=tmp_path / "a", kind="images"))
    with pytest.raises(MSDError, match="max-length"):
        prepare_features(llava_target, ROWS, PrepareSettings(output=tmp_path / "b", kind="text", max_length=5000))


def test_projected_size_matches_real_size(llava_target, image_root, tmp_path):
    settings = PrepareSettings(max_length=1000, output=tmp_path / "out", kind="vision", image_root=image_root)
    summary = prepare_features(llava_target, ROWS, settings)
    data_bytes = sum(t.numel() * t.element_size() for sample in stored_samples(settings.output) for t in sample.values())
    assert summary.projected_bytes == pytest.approx(data_bytes, rel=0.01)
    assert summary.size_bytes > data_bytes
    assert sample_bytes(10, 4, 64, 3, 2) == 14 * 64 * 2 + 10 * 6 + 120


def test_regenerate_uses_target_answers(llava_target, tmp_path):
    rows = [chat("What are numbers?", "Numbers 0 1 2 make words.", row_id="r")]
    settings = PrepareSettings(max_length=1000, output=tmp_path / "out", kind="text", regenerate=True, regenerate_max_tokens=5)
    assert prepare_features(llava_target, rows, settings).stored == 1

    processor = llava_target.processor
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What are numbers?"}]}], add_generation_prompt=True
    )
    inputs = processor(text=prompt, return_tensors="pt")
    with torch.no_grad():
        generated = llava_target.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    stored = stored_samples(settings.output)[0]
    answer_text = processor.tokenizer.decode(stored["input_ids"][stored["loss_mask"].bool()].tolist())
    assert answer_text == f" {answer.strip()}</s>"
    assert "Numbers 0 1 2 make words." not in processor.tokenizer.decode(stored["input_ids"].tolist())


@pytest.mark.parametrize("target_name", ["llava_target", "qwen_target"])
def test_batched_regenerate_matches_one_by_one(target_name, image_root, tmp_path, request):
    # Rows of different lengths, with 0, 1 and 2 images and a two-turn conversation, answered in one left-padded
    # batch, must store the same samples as rows answered one at a time.
    target = request.getfixturevalue(target_name)
    stored = {}
    for batch_size in (1, 3):
        settings = PrepareSettings(
            max_length=1000, output=tmp_path / f"batch-{batch_size}", kind="vision", image_root=image_root,
            regenerate=True, regenerate_max_tokens=6, regenerate_batch_size=batch_size,
        )
        assert prepare_features(target, ROWS, settings).stored == 3
        stored[batch_size] = stored_samples(settings.output)

    for single, batched in zip(stored[1], stored[3]):
        assert torch.equal(single["input_ids"], batched["input_ids"])
        assert torch.equal(single["loss_mask"], batched["loss_mask"])
    answers = [sample["input_ids"][sample["loss_mask"].bool()].tolist() for sample in stored[1]]
    assert len({tuple(answer) for answer in answers}) == 3  # the rows got different answers


def test_batched_regenerate_keeps_each_budget(llava_target):
    # The longer prompt leaves room for 2 answer tokens within max_length, the shorter one for 8. In one batch,
    # generate runs to the larger budget, and the longer prompt's answer must still end at its own.
    encoder = ConversationEncoder(llava_target.processor, llava_target.image_token_id, 1000)
    conversations = [parse_row(chat("Q", "A"), 0), parse_row(chat("Describe the numbers 0 1 2. " * 4, "A"), 1)]
    prompt_lengths = [encoder.prompt_inputs(item.messages[:1], [])["input_ids"].shape[1] for item in conversations]
    max_length = prompt_lengths[1] + 2
    assert max_length - prompt_lengths[0] >= 8

    answers = {}
    for batch_size in (1, 2):
        regenerator = AnswerRegenerator(llava_target, encoder, 8, max_length, batch_size=batch_size)
        answered = regenerator.regenerate(conversations, [[], []])
        answers[batch_size] = [item.messages[1]["content"][0]["text"] for item in answered]
    assert answers[2] == answers[1]
    tokenizer = encoder.tokenizer
    assert len(tokenizer(answers[1][1], add_special_tokens=False)["input_ids"]) < len(
        tokenizer(answers[1][0], add_special_tokens=False)["input_ids"]
    )


def test_regenerate_answers_each_turn(llava_target, tmp_path):
    # The second answer is generated after the regenerated first one, so both turns contain target answers.
    settings = PrepareSettings(
        max_length=1000, output=tmp_path / "out", kind="text", regenerate=True, regenerate_max_tokens=4
    )
    assert prepare_features(llava_target, [ROWS[1]], settings).stored == 1
    text = llava_target.processor.tokenizer.decode(stored_samples(settings.output)[0]["input_ids"].tolist())
    assert "Numbers 0 1 2 make words." not in text
    assert "Letters make sentences." not in text
    assert "And letters?" in text


def test_regenerate_batch_size_checked(tmp_path):
    # The settings check their own values, before any target is involved.
    with pytest.raises(MSDError, match="--regenerate-batch-size must be at least 1, got 0"):
        PrepareSettings(output=tmp_path / "out", kind="text", max_length=1000, regenerate=True, regenerate_batch_size=0)


def test_resume_with_other_regenerate_batch_size_raises(llava_target, tmp_path):
    # The batch size is in the dataset card: a resume that batches differently could store other answers.
    settings = PrepareSettings(
        output=tmp_path / "out", kind="text", max_length=1000, regenerate=True, regenerate_max_tokens=3,
        regenerate_batch_size=2,
    )
    first = prepare_features(llava_target, ROWS[1:2], settings).stored
    with pytest.raises(MSDError, match=r"regenerate_batch_size: 2 -> 4"):
        prepare_features(llava_target, ROWS[1:2], replace(settings, regenerate_batch_size=4))
    assert prepare_features(llava_target, ROWS[1:2], settings).stored == first == 1  # the same options resume


def test_resumed_regenerate_batches_alike(llava_target, tmp_path, monkeypatch):
    # A run stopped during its second regenerate batch resumes at that batch's first row, so every row is
    # regenerated in the same batch as in an uninterrupted run (shards of 3 rows, batches of 4).
    rows = [chat(f"Count to {number}.", "placeholder", row_id=f"row{number}") for number in range(8)]
    batches = []
    original = AnswerRegenerator.regenerate

    def recording(self, conversations, images):
        batches.append([conversation.sample_id for conversation in conversations])
        if stop_at is not None and len(batches) == stop_at:
            raise KeyboardInterrupt
        return original(self, conversations, images)

    monkeypatch.setattr(AnswerRegenerator, "regenerate", recording)
    settings = PrepareSettings(
        output=tmp_path / "out", kind="text", max_length=1000, regenerate=True, regenerate_max_tokens=2,
        regenerate_batch_size=4, shard_size=3,
    )
    stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        prepare_features(llava_target, rows, settings)
    stop_at = None
    assert prepare_features(llava_target, rows, settings).stored == 8
    assert batches[2:] == [[f"row{number}" for number in range(4, 8)]]


def test_part_resumes_after_its_last_committed_row(llava_target, tmp_path, monkeypatch, caplog):
    # Part 1/2 reads rows 1, 3, 5 and 7. Stopped while recording its third row, it resumes at that row: no row is
    # stored twice or left out. Reading the folder warns about the stopped part and about part 0/2, never started.
    rows = [chat(f"Count to {number}.", "One two.", row_id=f"row{number}") for number in range(8)]
    settings = PrepareSettings(output=tmp_path / "out", kind="text", max_length=1000, part=Part(1, 2), shard_size=2)
    recorded = []
    original = FeaturePreparer.record_row

    def recording(self, conversation, images, index):
        recorded.append(index)
        if len(recorded) == 3 and stop:
            raise KeyboardInterrupt
        return original(self, conversation, images, index)

    monkeypatch.setattr(FeaturePreparer, "record_row", recording)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        prepare_features(llava_target, rows, settings)
    with caplog.at_level("WARNING", logger="msd.data.dataset"):
        assert len(FeatureDataset(settings.output)) == 2
    assert f"parts not finished: {Part(1, 2).name}, {Part(0, 2).name} (not started)" in caplog.text
    stop = False
    assert prepare_features(llava_target, rows, settings).stored == 4
    assert recorded == [1, 3, 5, 5, 7]
    caplog.clear()
    with caplog.at_level("WARNING", logger="msd.data.dataset"):
        assert len(FeatureDataset(settings.output)) == 4
    assert f"parts not finished: {Part(0, 2).name} (not started)." in caplog.text
    manifest = (settings.output / f"{Part(1, 2).name}.manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["row"] for line in manifest] == [1, 3, 5, 7]


def test_projected_size_counts_regenerated_answers(llava_target, image_root, tmp_path):
    # With --regenerate the placeholder answers do not count: each turn is projected at the maximum answer length,
    # so long answers raise the projection and the real size stays near or below it
    sizes = {}
    for max_tokens in (2, 40):
        settings = PrepareSettings(
            max_length=1000, output=tmp_path / f"max-{max_tokens}", kind="vision", image_root=image_root,
            regenerate=True, regenerate_max_tokens=max_tokens,
        )
        summary = prepare_features(llava_target, ROWS, settings)
        samples = stored_samples(settings.output)
        data_bytes = sum(tensor.numel() * tensor.element_size() for sample in samples for tensor in sample.values())
        sizes[max_tokens] = summary.projected_bytes
        # the tiny word tokenizer re-encodes a decoded answer into somewhat more tokens than were generated
        assert summary.projected_bytes == pytest.approx(data_bytes, rel=0.3)
    assert sizes[40] > sizes[2]


def test_written_file_permissions(llava_target, tmp_path):
    # Shards, manifests, state and card are written under temporary names and renamed. Each must end up with the
    # permissions the umask gives any new file, so that a shared dataset folder stays readable for the group.
    umask = os.umask(0o022)
    try:
        settings = PrepareSettings(output=tmp_path / "out", kind="text", max_length=1000, shard_size=1)
        prepare_features(llava_target, ROWS[1:3], settings)
    finally:
        os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in settings.output.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o644}, modes
