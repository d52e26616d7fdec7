"""DraftRunner (the drafting-time forward) against the draft's module forward, and int8 draft weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from msd.decoding.vocabulary import DraftVocabulary
from msd.draft import DraftConfig, DraftModel
from msd.draft.model import causal_mask
from msd.draft.quantize import Int8Linear, quantize_linear_layers, to_int8
from msd.draft.runner import DraftRunner
from msd.targets import adapter_for
from msd.targets.base import truncate_cache
from msd.targets.batch_invariant import supported
from tiny_models import build_llava

needs_bf16 = pytest.mark.skipif(not supported(), reason="needs a CPU with oneDNN bfloat16 products")


def make_draft(target, seed=3):
    torch.manual_seed(seed)
    return DraftModel(DraftConfig.for_target(target)).attach(target).eval()


def random_slots(target, draft, count, first_position, generator):
    """Tokens (T,), features (T, H) and positions (P, T) of `count` slots."""
    tokens = torch.randint(0, target.vocab_size, (count,), generator=generator)
    features = torch.randn(count, target.hidden_size, generator=generator, dtype=target.dtype)
    positions = torch.arange(first_position, first_position + count).expand(draft.position_rows, count)
    return tokens, features, positions


def module_forward(draft, cache, tokens, features, positions, mask):
    """The draft's own forward over the same slots, with a DynamicCache."""
    return draft(tokens[None], features[None], positions[:, None], mask[None, None], cache)[0]


def tree_mask(cached, parents, dtype):
    """Additive mask of new slots that attend to the cache, their ancestors among the new slots and themselves."""
    count = len(parents)
    allowed = torch.zeros(count, cached + count, dtype=torch.bool)
    allowed[:, :cached] = True
    for slot, parent in enumerate(parents):
        if parent >= 0:
            allowed[slot, cached:] = allowed[parent, cached:]
        allowed[slot, cached + slot] = True
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def test_runner_matches_module_forward(family):
    # The runner's fast path (LLaVA's Llama layers) and its module path (Qwen2-VL) predict what the module predicts.
    runner = check_runner_matches_module(family.target)
    assert runner.fast == (family.name == "llava")


def test_runner_fast_path_qwen2_layers():
    # Qwen2 decoder layers have biased query, key and value projections, which the fused projection must keep.
    model, _ = build_llava(seed=2, text_family="qwen2")
    runner = check_runner_matches_module(adapter_for(model))
    assert runner.fast
    assert runner.layers[0].qkv.bias is not None


def check_runner_matches_module(target) -> DraftRunner:
    """Compare a runner with the module forward over a prompt, a tree of slots with its mask, then, after dropping
    the tree, over more slots than the runner first reserved. Returns the runner."""
    draft = make_draft(target)
    runner = DraftRunner(draft)
    runner.reset()
    cache = DynamicCache()
    generator = torch.Generator().manual_seed(0)
    tokens, features, positions = random_slots(target, draft, 40, 0, generator)
    mask = causal_mask(40, target.dtype, "cpu")
    expected = module_forward(draft, cache, tokens, features, positions, mask)
    torch.testing.assert_close(runner.extend(tokens, features, positions, mask), expected)

    parents = [-1, 0, 0, 1, 2]  # two chains below one slot
    tokens, features, positions = random_slots(target, draft, len(parents), 40, generator)
    mask = tree_mask(40, parents, target.dtype)
    expected = module_forward(draft, cache, tokens, features, positions, mask)
    torch.testing.assert_close(runner.extend(tokens, features, positions, mask), expected)

    runner.truncate(40)
    truncate_cache(cache, 40)
    tokens, features, positions = random_slots(target, draft, 300, 40, generator)
    mask = causal_mask(300, target.dtype, "cpu", cached=40)
    expected = module_forward(draft, cache, tokens, features, positions, mask)
    torch.testing.assert_close(runner.extend(tokens, features, positions, mask), expected)
    assert runner.length == 340
    return runner


def test_runner_truncate_beyond_length_rejected(llava_family):
    # Keeping more slots than the cache contains would read keys never written.
    runner = DraftRunner(make_draft(llava_family.target))
    runner.reset()
    with pytest.raises(ValueError, match="cannot keep 3 slots"):
        runner.truncate(3)


def test_runner_mask_width_checked(llava_family):
    # A mask built for another cache length would broadcast into an opaque attention error, so it fails early.
    target = llava_family.target
    draft = make_draft(target)
    runner = DraftRunner(draft)
    runner.reset()
    tokens, features, positions = random_slots(target, draft, 4, 0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="the mask covers 6 slots"):
        runner.extend(tokens, features, positions, causal_mask(4, target.dtype, "cpu", cached=2))


def test_runner_reset_starts_new_sequence(family):
    # After reset the runner drops the earlier sequence: a new prompt predicts what a fresh module forward does.
    target = family.target
    draft = make_draft(target)
    runner = DraftRunner(draft)
    runner.reset()
    generator = torch.Generator().manual_seed(3)
    runner.extend(*random_slots(target, draft, 20, 0, generator), causal_mask(20, target.dtype, "cpu"))
    runner.reset()
    assert runner.length == 0
    tokens, features, positions = random_slots(target, draft, 8, 0, generator)
    mask = causal_mask(8, target.dtype, "cpu")
    expected = module_forward(draft, DynamicCache(), tokens, features, positions, mask)
    torch.testing.assert_close(runner.extend(tokens, features, positions, mask), expected)


@needs_bf16
def test_packed_runner_close_to_module():
    # A packed bfloat16 draft runs fused projections, in int8 for a few slots (the second call). Its predictions stay
    # close to the unpacked module's.
    model, _ = build_llava(seed=5, dtype=torch.bfloat16, hidden_size=256, intermediate_size=688)
    target = adapter_for(model)
    draft = make_draft(target)
    runner = DraftRunner(draft.packed_copy())
    assert type(runner.layers[0].qkv) is Int8Linear
    assert type(runner.layers[0].gate_up) is Int8Linear
    runner.reset()
    cache = DynamicCache()
    generator = torch.Generator().manual_seed(1)
    for cached, count in [(0, 12), (12, 3)]:
        tokens, features, positions = random_slots(target, draft, count, cached, generator)
        mask = causal_mask(count, torch.bfloat16, "cpu", cached=cached)
        expected = module_forward(draft, cache, tokens, features, positions, mask).float()
        predicted = runner.extend(tokens, features, positions, mask).float()
        assert (predicted - expected).norm() / expected.norm() < 0.05


@needs_bf16
@pytest.mark.parametrize("rows", [1, 4, 5, 30])
def test_int8_linear_close_to_bfloat16(rows):
    # Up to 4 rows multiply with int8 weights (within about 1%), more rows with the bfloat16 weights.
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(torch.bfloat16)
    inputs = torch.randn(rows, 1, 96, dtype=torch.bfloat16)
    expected = F.linear(inputs, linear.weight, linear.bias).float()
    output = Int8Linear(linear)(inputs)
    assert output.shape == (rows, 1, 40)
    assert (output.float() - expected).norm() / expected.norm() < (0.02 if rows <= 4 else 0.005)


@needs_bf16
def test_int8_needs_width_multiple_of_16():
    # Other input widths crashed or multiplied wrongly in torch 2.13, so they stay in bfloat16.
    assert type(to_int8(nn.Linear(64, 8).to(torch.bfloat16))) is Int8Linear
    assert to_int8(nn.Linear(72, 8).to(torch.bfloat16)) is None
    assert to_int8(nn.Linear(64, 8)) is None  # float32 weights keep PyTorch's kernels


@needs_bf16
def test_quantize_skips_unsupported_layers():
    # Only the layer with a supported width is replaced, and the other keeps its weights untouched.
    module = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 24), nn.Linear(24, 8)).to(torch.bfloat16)
    unchanged_weight = module[2].weight
    assert quantize_linear_layers(module) == 2
    assert [type(layer) for layer in module] == [Int8Linear, Int8Linear, nn.Linear]
    assert module[2].weight is unchanged_weight


@needs_bf16
def test_packed_vocabulary_adds_int8_rows():
    # The prompt's extra LM-head rows of a packed draft multiply as int8 too, close to their bfloat16 products.
    model, _ = build_llava(seed=5, dtype=torch.bfloat16, hidden_size=256, intermediate_size=688)
    target = adapter_for(model)
    draft = DraftModel(DraftConfig.for_target(target, draft_vocab_size=64)).attach(target).eval()
    packed = draft.packed_copy()
    prompt = torch.arange(100, 140)
    vocabulary = DraftVocabulary.for_prompt(packed, target.lm_head.weight, prompt)
    assert type(vocabulary.added_layer) is Int8Linear
    hidden = torch.randn(4, target.hidden_size, dtype=torch.bfloat16)
    expected = DraftVocabulary.for_prompt(draft, target.lm_head.weight, prompt).logits(hidden).float()
    logits = vocabulary.logits(hidden).float()
    assert logits.shape == expected.shape
    assert (logits - expected).norm() / expected.norm() < 0.05
