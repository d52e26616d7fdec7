"""LLaVA-format rows -> chat-templated ids and loss masks, with the LLaVA (Vicuna) and Qwen2-VL (ChatML) templates."""

from __future__ import annotations

import pytest
import torch
from data_helpers import TinyQwen2VLProcessor, chat
from tiny_models import TinyQwen2VL, build_llava, random_image

from msd.data.conversations import ConversationEncoder, RowError, SkipReason, load_images, parse_row


@pytest.fixture(scope="module")
def llava():
    return build_llava(seed=0)


@pytest.fixture(scope="module")
def qwen():
    tiny = TinyQwen2VL(seed=0)
    return tiny, TinyQwen2VLProcessor(tiny)


def masked_runs(input_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Token ids of each contiguous run of True in mask."""
    runs, current = [], []
    for token, keep in zip(input_ids.tolist(), mask.tolist()):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_parse_row_places_images():
    row = chat("<image>\nWhat is it?", "A cat.", "And <image> here?", "A dog.", image=["a.png", "b.png"])
    conversation = parse_row(row, 0)
    assert conversation.images == ["a.png", "b.png"]
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert [item["type"] for item in conversation.messages[2]["content"]] == ["text", "image", "text"]


def test_parse_row_without_placeholder_puts_images_first():
    conversation = parse_row(chat("Describe.", "Noise.", image="a.png"), 3)
    assert conversation.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe."}]


def test_parse_row_trims_unanswerable_turns():
    row = {"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"}]}
    conversation = parse_row(row, 7)
    assert conversation.sample_id == "7"
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"]


def test_parse_row_system_prompt():
    conversation = parse_row(chat("Q", "A"), 0, system_prompt="Be brief.")
    assert conversation.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"id": 1}, SkipReason.MALFORMED_ROW),
        ([1, 2], SkipReason.MALFORMED_ROW),
        (chat("only a question"), SkipReason.NO_ASSISTANT_TURN),
        ({"conversations": [{"from": "robot", "value": "x"}]}, SkipReason.MALFORMED_ROW),
        (chat("<image> <image>", "A", image="a.png"), SkipReason.MALFORMED_ROW),
        (chat("Q", "see <image>", image="a.png"), SkipReason.MALFORMED_ROW),
        (chat("Q", "A", image=5), SkipReason.MALFORMED_ROW),
    ],
)
def test_parse_row_rejects(row, reason):
    with pytest.raises(RowError) as caught:
        parse_row(row, 0)
    assert caught.value.reason == reason


def test_load_images_reasons(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    random_image(20, 20).save(tmp_path / "ok.png")
    assert len(load_images(parse_row(chat("Q", "A", image="ok.png"), 0), tmp_path)) == 1
    with pytest.raises(RowError) as missing:
        load_images(parse_row(chat("Q", "A", image="gone.png"), 0), tmp_path)
    assert missing.value.reason == SkipReason.MISSING_IMAGE
    with pytest.raises(RowError) as unreadable:
        load_images(parse_row(chat("Q", "A", image="bad.png"), 0), tmp_path)
    assert unreadable.value.reason == SkipReason.UNREADABLE_IMAGE


def test_llava_loss_mask_covers_answers(llava):
    model, processor = llava
    encoder = ConversationEncoder(processor, model.config.image_token_id, max_length=1000)
    row = chat("<image>\nWhat is in this image?", "A cat sits on a red mat.", "And the dog?", "The quick fox.",
               image="a.png")
    sample = encoder.encode(parse_row(row, 0), [random_image(60, 50)])
    input_ids = sample.inputs["input_ids"][0]
    decoded = [processor.tokenizer.decode(run) for run in masked_runs(input_ids, sample.loss_mask)]
    assert decoded == [" A cat sits on a red mat.</s>", " The quick fox.</s>"]
    assert not sample.loss_mask[input_ids == model.config.image_token_id].any()
    assert int((input_ids == model.config.image_token_id).sum()) == model.config.image_seq_length


def test_qwen2_vl_loss_mask_covers_answers(qwen):
    tiny, processor = qwen
    encoder = ConversationEncoder(processor, tiny.image_token_id, max_length=1000)
    images = [random_image(60, 60, seed=1), random_image(90, 60, seed=2)]
    row = chat("Compare <image> with <image>", "The first is red.", "Why?", "Numbers and letters.",
               image=["a.png", "b.png"])
    sample = encoder.encode(parse_row(row, 0), images)
    input_ids = sample.inputs["input_ids"][0]
    decoded = [tiny.tokenizer.decode(run) for run in masked_runs(input_ids, sample.loss_mask)]
    assert decoded == ["The first is red.<|im_end|>", "Numbers and letters.<|im_end|>"]
    expected_visual = sum(int(grid.prod()) // 4 for grid in sample.inputs["image_grid_thw"])
    assert int((input_ids == tiny.image_token_id).sum()) == expected_visual
    assert sample.images == 2


def test_truncation_keeps_whole_turns(qwen):
    tiny, processor = qwen
    row = chat("Describe.", "A cat sits on a red mat.", "More words please and more.", "The quick brown fox.")
    full = ConversationEncoder(processor, tiny.image_token_id, max_length=1000).encode(parse_row(row, 0), [])
    full_ids = full.inputs["input_ids"][0]
    first_end = int(masked_runs(full_ids, full.loss_mask)[0].__len__())  # tokens in the first answer
    first_turn_end = int(full.loss_mask.nonzero()[first_end - 1]) + 1

    encoder = ConversationEncoder(processor, tiny.image_token_id, max_length=first_turn_end + 2)
    truncated = encoder.encode(parse_row(row, 0), [])
    assert torch.equal(truncated.inputs["input_ids"][0], full_ids[:first_turn_end])
    assert torch.equal(truncated.loss_mask, full.loss_mask[:first_turn_end])

    with pytest.raises(RowError) as caught:
        ConversationEncoder(processor, tiny.image_token_id, max_length=first_turn_end - 1).encode(
            parse_row(row, 0), []
        )
    assert caught.value.reason == SkipReason.TOO_LONG


def test_truncation_drops_later_images(llava):
    model, processor = llava
    row = chat("<image>\nWhat?", "A cat.", "<image>\nAnd this?", "A dog.", image=["a.png", "b.png"])
    images = [random_image(56, 56, seed=1), random_image(56, 56, seed=2)]
    full = ConversationEncoder(processor, model.config.image_token_id, 1000).encode(parse_row(row, 0), images)
    first_turn_end = int(full.loss_mask.nonzero()[0]) + len(masked_runs(full.inputs["input_ids"][0], full.loss_mask)[0])
    truncated = ConversationEncoder(processor, model.config.image_token_id, first_turn_end + 5).encode(
        parse_row(row, 0), images
    )
    assert truncated.images == 1
    assert truncated.inputs["pixel_values"].shape[0] == 1
    assert truncated.inputs["input_ids"].shape[1] == first_turn_end


def test_encoder_requires_chat_template(llava):
    model, processor = llava

    class NoTemplate:
        chat_template = None

    from msd.errors import MSDError

    with pytest.raises(MSDError, match="chat template"):
        ConversationEncoder(NoTemplate(), model.config.image_token_id, 100)
