"""SmallBatchLinear: same product as nn.Linear, switched in place by load_target on CPU, decoding unchanged."""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftConfig, DraftModel
from msd.errors import MSDError
from msd.targets import load_target
from msd.targets.cpu_linear import (
    SmallBatchLinear,
    pick_max_rows,
    pick_pad_one_row,
    time_products,
    use_small_batch_linears,
)
from tiny_models import build_llava, llava_inputs, random_image


@pytest.mark.parametrize("pad_one_row", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(), (1,), (2,)])
def test_matches_linear_for_all_row_counts(bias, leading, pad_one_row):
    # rows 0..12 cover the transposed product (1..8, one row padded or not) and the F.linear fallback (0 and 9..12)
    torch.manual_seed(0)
    reference = nn.Linear(24, 40, bias=bias, dtype=torch.float64)
    switched = nn.Linear(24, 40, bias=bias, dtype=torch.float64)
    switched.load_state_dict(reference.state_dict())
    use_small_batch_linears(switched, pad_one_row=pad_one_row)
    for rows in range(13):
        if leading == (2,) and rows % 2:
            continue  # (2, rows / 2, 24) inputs need an even row count
        shape = (*leading, rows // 2, 24) if leading == (2,) else (*leading, rows, 24)
        inputs = torch.randn(shape, dtype=torch.float64)
        expected = reference(inputs)
        actual = switched(inputs)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_switch_keeps_parameters_and_ties():
    model, _ = build_llava(seed=0)
    names_before = list(model.state_dict())
    head = model.lm_head.weight
    tied = head is model.get_input_embeddings().weight
    linear_count = sum(type(layer) is nn.Linear for layer in model.modules())

    changed = use_small_batch_linears(model)

    assert changed == linear_count > 0
    assert not any(type(layer) is nn.Linear for layer in model.modules())
    assert model.lm_head.weight is head
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert list(model.state_dict()) == names_before


def test_padded_row_without_row_limit():
    # With no row limit, padding a single row still switches the layer: one row takes the padded product and two
    # rows F.linear.
    torch.manual_seed(0)
    layer = nn.Linear(8, 6, dtype=torch.float64)
    assert use_small_batch_linears(layer, max_rows=0, pad_one_row=True) == 1
    assert isinstance(layer, SmallBatchLinear)
    for rows in (1, 2):
        inputs = torch.randn(rows, 8, dtype=torch.float64)
        torch.testing.assert_close(layer(inputs), inputs @ layer.weight.T + layer.bias, rtol=1e-12, atol=1e-12)


class MatmulShapes(TorchFunctionMode):
    """Records the shape of the second operand of every torch.matmul call."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.matmul:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("max_rows", "pad_one_row", "expected"), [(0, True, [(8, 2)]), (2, True, [(8, 2)]), (2, False, [(8, 1)])]
)
def test_single_row_product_padded(max_rows, pad_one_row, expected):
    # pad_one_row sends one row through the matrix-matrix product as two columns, and without it the row stays alone.
    layer = nn.Linear(8, 6)
    use_small_batch_linears(layer, max_rows=max_rows, pad_one_row=pad_one_row)
    with MatmulShapes() as recorder:
        layer(torch.randn(1, 8))
    assert recorder.shapes == expected


def test_time_products_pads_single_row():
    # The one-row timing of the transposed product runs on the padded row, as the layer computes it.
    model = nn.Sequential(nn.Linear(16, 32))
    with MatmulShapes() as recorder:
        time_products(model, rows=(1,), repeats=1)
    assert recorder.shapes
    assert set(recorder.shapes) == {(16, 2)}


def test_zero_rows_keeps_layers_and_negative_raises():
    layer = nn.Linear(4, 4)
    assert use_small_batch_linears(layer, max_rows=0) == 0
    assert type(layer) is nn.Linear
    with pytest.raises(MSDError, match="row limit"):
        use_small_batch_linears(layer, max_rows=-1)


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    model, processor = build_llava(seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_load_target_switches_only_when_asked(saved_target):
    switched = load_target(saved_target, dtype="float64", cpu_linear_rows=4)
    assert isinstance(switched.lm_head, SmallBatchLinear)
    assert switched.lm_head.max_rows == 4
    stock = load_target(saved_target, dtype="float64", cpu_linear_rows=0)
    assert type(stock.lm_head) is nn.Linear


def test_load_target_auto_applies_measured_limit(saved_target, monkeypatch):
    # "auto" (the default) switches the layers exactly when the timing shows the transposed product winning
    import msd.targets.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "time_products", lambda module: {2: (1.0, 0.5), 4: (1.0, 0.6), 8: (1.0, 2.0)})
    measured = load_target(saved_target, dtype="float64")
    assert isinstance(measured.lm_head, SmallBatchLinear)
    assert measured.lm_head.max_rows == 4

    monkeypatch.setattr(cpu_linear, "time_products", lambda module: {2: (1.0, 2.0), 4: (1.0, 2.0), 8: (1.0, 2.0)})
    assert type(load_target(saved_target, dtype="float64").lm_head) is nn.Linear

    # A single row padded to two wins on its own (the Zen 4 case), so only one-row inputs change their product.
    monkeypatch.setattr(cpu_linear, "time_products", lambda module: {1: (1.0, 0.4), 2: (1.0, 2.0), 4: (1.0, 2.0)})
    padded = load_target(saved_target, dtype="float64")
    assert isinstance(padded.lm_head, SmallBatchLinear)
    assert padded.lm_head.max_rows == 0
    assert padded.lm_head.pad_one_row


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({2: (1.0, 0.4), 4: (1.0, 0.5), 8: (1.0, 0.8)}, 8),  # transposed faster throughout (Zen 3 here)
        ({2: (1.0, 2.4), 4: (1.0, 1.7), 8: (1.0, 3.4)}, 0),  # F.linear faster throughout (Emerald Rapids Xeon here)
        ({2: (1.0, 0.5), 4: (1.0, 0.95), 8: (1.0, 0.5)}, 2),  # a loss at 4 rows stops the limit at 2
        ({1: (1.0, 2.0), 2: (1.0, 0.5), 4: (1.0, 0.5)}, 4),  # the padded single row is decided on its own
        ({}, 0),  # a model without linear layers
    ],
)
def test_pick_max_rows(times, expected):
    assert pick_max_rows(times) == expected


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({1: (1.0, 0.4), 2: (1.0, 0.5)}, True),  # the padded row reads the weights faster (Zen 4 here)
        ({1: (1.0, 1.05), 2: (1.0, 0.5)}, False),  # one row costs as much either way (Zen 3 here)
        ({2: (1.0, 0.5)}, False),  # one row not timed
    ],
)
def test_pick_pad_one_row(times, expected):
    assert pick_pad_one_row(times) is expected


def test_time_products_times_each_row_count():
    # both products are timed over the most common weight shape, so every candidate gets two positive times
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 32))
    times = time_products(model, rows=(1, 2, 4), repeats=2)
    assert sorted(times) == [1, 2, 4]
    for linear, transposed in times.values():
        assert linear > 0
        assert transposed > 0
    assert time_products(nn.ReLU()) == {}


@pytest.mark.parametrize(("max_rows", "pad_one_row"), [(8, False), (4, True), (0, True)])
def test_switched_target_decodes_like_generate(saved_target, max_rows, pad_one_row):
    # With the switched layers (one row padded or not), tree decoding still equals transformers' generate on the same
    # model, token for token. The drafter's copy of the draft takes the same layers.
    target = load_target(saved_target, dtype="float64", cpu_linear_rows=0)
    use_small_batch_linears(target.model, max_rows, pad_one_row)
    torch.manual_seed(1)
    draft = DraftModel(DraftConfig.for_target(target)).double()
    inputs = llava_inputs(target.processor, "What is in this picture?", [random_image(60, 48, seed=2)])
    expected = target.model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    expected = expected[0, inputs["input_ids"].shape[1] :].tolist()

    tree = TreeParams(depth=3, top_k=2, total_tokens=6)
    generator = SpeculativeGenerator(target, draft, tree)
    output = generator.generate(inputs, max_new_tokens=16, eos_token_ids=[])
    assert output.token_ids == expected
    assert generator.drafter.draft.fc.pad_one_row is pad_one_row


def test_drafter_takes_target_choice(saved_target):
    # Next to a switched target, the drafter's copy of the draft multiplies with the same layers (its fused ones and
    # its LM head too), and the caller's draft keeps nn.Linear.
    from msd.decoding.drafter import MSDDrafter

    target = load_target(saved_target, dtype="float64", cpu_linear_rows=2)
    target.lm_head.pad_one_row = True
    draft = DraftModel(DraftConfig.for_target(target)).double()
    drafter = MSDDrafter(draft, target)
    assert type(draft.fc) is nn.Linear
    assert isinstance(drafter.draft.fc, SmallBatchLinear)
    assert drafter.draft.fc.max_rows == 2
    assert drafter.draft.fc.pad_one_row
    head = drafter.draft._shared["head_layer"]
    assert isinstance(head, SmallBatchLinear)
    hidden = torch.randn(1, target.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(drafter.draft.compute_logits(hidden), draft.compute_logits(hidden))
    assert drafter.runner.fast
    assert isinstance(drafter.runner.layers[0].qkv, SmallBatchLinear)
    assert drafter.runner.layers[0].qkv.max_rows == 2
    assert drafter.runner.layers[0].qkv.pad_one_row


def test_cli_option_parses_rows_or_auto():
    import argparse

    from msd.cli.options import parse_cpu_linear_rows

    assert parse_cpu_linear_rows("auto") == "auto"
    assert parse_cpu_linear_rows("0") == 0
    assert parse_cpu_linear_rows("8") == 8
    with pytest.raises(argparse.ArgumentTypeError, match="invalid row count 'eight': use a whole number or auto"):
        parse_cpu_linear_rows("eight")
    with pytest.raises(argparse.ArgumentTypeError, match="invalid row count -1: use 0 or more, or auto"):
        parse_cpu_linear_rows("-1")
