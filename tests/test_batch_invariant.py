"""Batch-invariant bfloat16 CPU kernels: every token of a decoding forward gets the bits of a one-token forward.

These tests run the tiny targets in bfloat16, where PyTorch's own kernels round a token differently depending on how
many tokens share the forward. The comparisons are bitwise or token for token, with no tolerance.
"""

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msd.decoding import DraftTree, SpeculativeGenerator, TreeParams
from msd.decoding.drafter import MSDDrafter
from msd.draft import DraftConfig, DraftModel
from msd.draft.quantize import Int8Linear
from msd.errors import MSDError
from msd.cli import main
from msd.evaluate.method_setup import FUSED_PROMPT_REASON, build_methods, drop_unsupported
from msd.evaluate.report import markdown_report
from msd.evaluate import tree_tuning
from msd.evaluate.tree_tuning import tune_tree
from msd.targets import adapter_for, load_target
from msd.targets import batch_invariant
from msd.targets.base import truncate_cache
from msd.targets.batch_invariant import (
    ROWS,
    InvariantLinear,
    rows_independent,
    skip_padding_where_exact,
    use_batch_invariant_kernels,
)
from oracle import OracleDrafter
from conftest import Family
from tiny_models import CORPUS, TinyQwen2VL, build_llava, llava_inputs, random_image

pytestmark = pytest.mark.skipif(
    not batch_invariant.supported(), reason="this CPU has no native bfloat16 support (AVX-512 BF16 or AMX)"
)

#: a branching tree of 9 nodes: parent of each node after the root
PARENTS = [0, 0, 1, 1, 2, 3, 3, 6]


def branching_tree(tokens: list[int]) -> DraftTree:
    """A DraftTree over `tokens` (root first) with the PARENTS shape."""
    return DraftTree(tokens=torch.tensor(tokens), parents=torch.tensor([-1, *PARENTS]))


def path_to(node: int) -> list[int]:
    """Node indices from the root to `node`."""
    parents = [-1, *PARENTS]
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


@pytest.fixture(scope="module")
def bf16_llava():
    # A wider model than the float64 fixtures, so its products run through oneDNN's blocked bfloat16 kernels.
    model, processor = build_llava(seed=5, dtype=torch.bfloat16, hidden_size=256, intermediate_size=688)
    family = Family("llava", model, lambda text, images: llava_inputs(processor, text, images))
    use_batch_invariant_kernels(family.target)
    return family


@pytest.fixture(scope="module")
def bf16_qwen():
    tiny = TinyQwen2VL(seed=5, dtype=torch.bfloat16, hidden_size=256, intermediate_size=688)
    family = Family("qwen2_vl", tiny.model, tiny.inputs)
    use_batch_invariant_kernels(family.target)
    return family


@pytest.fixture(params=["llava", "qwen2_vl"])
def bf16_family(request, bf16_llava, bf16_qwen):
    return bf16_llava if request.param == "llava" else bf16_qwen


@pytest.mark.parametrize("bias", [True, False])
def test_linear_rows_independent(bias):
    # Each row of a forward over 1..16 rows equals the same row of a full 16-row forward, bit for bit.
    torch.manual_seed(0)
    linear = nn.Linear(160, 96, bias=bias).to(torch.bfloat16)
    layer = InvariantLinear(linear)
    inputs = torch.randn(ROWS, 160).to(torch.bfloat16)
    full = layer(inputs)
    for rows in range(1, ROWS + 1):
        assert torch.equal(layer(inputs[:rows]), full[:rows])
        assert torch.equal(layer(inputs[None, :rows])[0], full[:rows])  # leading batch dimension
    torch.testing.assert_close(full, F.linear(inputs, linear.weight, linear.bias), rtol=2e-2, atol=2e-2)


class CountDependentLinear(InvariantLinear):
    """A layer whose rounding depends on the row count, as a kernel chosen by row count could."""

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        output = super().product(flat)
        return output + 0.5 if flat.shape[0] < self.rows else output


def test_unpadded_rows_where_exact():
    # Shapes that pass the check run unpadded and still give each row its full-product bits at every row count.
    torch.manual_seed(1)
    layer = InvariantLinear(nn.Linear(160, 96).to(torch.bfloat16))
    if not rows_independent(layer):
        pytest.skip("this CPU's oneDNN rounds rows differently by row count, so padding stays on")
    assert skip_padding_where_exact([layer]) == 1
    assert not layer.pad
    inputs = torch.randn(ROWS, 160).to(torch.bfloat16)
    full = layer(inputs)
    for rows in range(1, ROWS + 1):
        assert torch.equal(layer(inputs[ROWS - rows :]), full[ROWS - rows :])


def test_padding_kept_for_count_dependent_rounding():
    # A layer whose result changes with the row count fails the check and keeps padding, which makes it exact again.
    torch.manual_seed(1)
    layer = CountDependentLinear(nn.Linear(160, 96).to(torch.bfloat16))
    assert not rows_independent(layer)
    assert skip_padding_where_exact([layer]) == 0
    assert layer.pad
    inputs = torch.randn(ROWS, 160).to(torch.bfloat16)
    assert torch.equal(layer(inputs[:3]), layer(inputs)[:3])


class OneRowLinear(InvariantLinear):
    """A layer whose one-row product rounds differently from its larger products, as oneDNN's did on a Zen 4 CPU
    for 1,536 input features."""

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        output = super().product(flat)
        return output + 0.5 if flat.shape[0] == 1 else output


class PositionDependentLinear(InvariantLinear):
    """A layer that rounds every row after the first differently in products of several rows, so padding cannot
    make it exact."""

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        output = super().product(flat)
        if flat.shape[0] > 1:
            output[1:] += 0.5
        return output


def test_one_row_kernel_padded():
    # Every row is compared with the same row alone, so a different one-row kernel is found and padding stays on.
    layer = OneRowLinear(nn.Linear(160, 96).to(torch.bfloat16))
    assert not rows_independent(layer)
    assert rows_independent(layer, padded=True)
    assert skip_padding_where_exact([layer]) == 0
    assert layer.pad


def test_inexact_shape_rejected():
    # A shape that stays inexact when padded cannot verify trees: the check raises a clear error.
    layer = PositionDependentLinear(nn.Linear(160, 96).to(torch.bfloat16))
    assert not rows_independent(layer, padded=True)
    with pytest.raises(MSDError, match="160.*float32"):
        skip_padding_where_exact([layer])


def test_inexact_shape_leaves_model(monkeypatch):
    # When the check raises, the model keeps its own linear layers instead of being half converted.
    model, _ = build_llava(seed=3, dtype=torch.bfloat16)
    monkeypatch.setattr(batch_invariant, "InvariantLinear", PositionDependentLinear)
    with pytest.raises(MSDError, match="even padded"):
        use_batch_invariant_kernels(adapter_for(model))
    assert not any(isinstance(module, InvariantLinear) for module in model.modules())


def test_down_projection_exact_after_check():
    # A real layer with 1,536 inputs (rounded differently alone on a Zen 4 CPU): after the check, every row of every
    # row count matches that row alone through forward, padded or not.
    torch.manual_seed(0)
    layer = InvariantLinear(nn.Linear(1536, 576).to(torch.bfloat16))
    skip_padding_where_exact([layer])
    inputs = batch_invariant.random_rows(ROWS, 1536, torch.Generator().manual_seed(3)).to(torch.bfloat16)
    alone = torch.cat([layer(inputs[row : row + 1]) for row in range(ROWS)])
    for count in range(2, ROWS + 1):
        assert torch.equal(layer(inputs[:count]), alone[:count])


def run_python(code: str) -> str:
    """Run `code` in a fresh Python without MKL_CBWR in its environment and return what it prints."""
    environment = {name: value for name, value in os.environ.items() if name != "MKL_CBWR"}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


#: prints (keys, row) for each row of a batched bfloat16 SDPA call that differs from the same row computed alone
ATTENTION_CHECK = """
import torch
import torch.nn.functional as F
generator = torch.Generator().manual_seed(0)
differing = []
for width in range(32, 1025, 32):
    queries = torch.randn(16, 3, 3, 64, generator=generator).to(torch.bfloat16)
    keys = (torch.randn(16, 3, width, 64, generator=generator) * 2).to(torch.bfloat16)
    values = torch.randn(16, 3, width, 64, generator=generator).to(torch.bfloat16)
    mask = torch.zeros(16, 1, 1, width, dtype=torch.bfloat16)
    mask[..., width - 5 :] = torch.finfo(torch.bfloat16).min
    full = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=0.125)
    for row in range(16):
        alone_row = slice(row, row + 1)
        alone = F.scaled_dot_product_attention(
            queries[alone_row], keys[alone_row], values[alone_row], attn_mask=mask[alone_row], scale=0.125
        )
        if not torch.equal(alone[0], full[row]):
            differing.append((width, row))
print(differing)
"""


@pytest.mark.skipif(batch_invariant.mkl_mode_functions() is None, reason="MKL's mode functions are not reachable")
def test_strict_mkl_fresh_process():
    # Before MKL's first call, msd switches it to strict mode. Then each row of batched attention matches the row
    # alone. On a Zen 4 CPU in MKL's default mode, row 15 at 288 keys differed.
    printed = run_python(
        "from msd.targets.batch_invariant import MKL_CBWR_ALL, enable_strict_mkl, mkl_mode_functions\n"
        "print(enable_strict_mkl(), mkl_mode_functions()[0](MKL_CBWR_ALL) & 0x10000)\n" + ATTENTION_CHECK
    )
    assert printed.splitlines() == ["True 65536", "[]"]


@pytest.mark.skipif(batch_invariant.mkl_mode_functions() is None, reason="MKL's mode functions are not reachable")
def test_strict_mkl_too_late():
    # After a float32 product has started MKL in its default mode, the switch fails and returns False.
    printed = run_python(
        "import torch\ntorch.randn(8, 8) @ torch.randn(8, 8)\n"
        "from msd.targets.batch_invariant import enable_strict_mkl\nprint(enable_strict_mkl())"
    )
    assert printed == "False"


def test_cli_sets_mkl_cbwr(monkeypatch):
    # The msd command sets MKL_CBWR=AUTO,STRICT in the environment before its subcommands run.
    monkeypatch.delenv("MKL_CBWR", raising=False)
    main(["embedded", "options"])
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"


def test_switch_needs_strict_mkl(monkeypatch):
    # When MKL already runs in another mode, the switch raises an error that names the environment setting.
    monkeypatch.setattr(batch_invariant, "enable_strict_mkl", lambda: False)
    model, _ = build_llava(seed=3, dtype=torch.bfloat16)
    with pytest.raises(MSDError, match="MKL_CBWR=AUTO,STRICT"):
        use_batch_invariant_kernels(adapter_for(model))


def test_linear_prompts_and_parameters():
    # Longer inputs run unpadded; the parameters are the wrapped layer's own.
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    layer = InvariantLinear(linear)
    prompt = torch.randn(1, 40, 64).to(torch.bfloat16)
    assert layer(prompt).shape == (1, 40, 48)
    assert layer.weight is linear.weight
    assert layer.bias is linear.bias
    assert layer(prompt[:, :0]).shape == (1, 0, 48)


def test_linear_rejects_float32():
    with pytest.raises(MSDError, match="bfloat16 weights"):
        InvariantLinear(nn.Linear(8, 8))


@pytest.mark.parametrize("prompt_words", [8, 200])
def test_tree_node_matches_path(bf16_family, prompt_words):
    # Each node of a branching tree gets the logits its path gets when decoded one token at a time. The long prompt
    # (more than 512 keys in the cache for LLaVA) crosses the attention kernel's key blocks.
    target = bf16_family.target
    text = " ".join((" ".join(CORPUS)).split()[:prompt_words] * (1 + prompt_words // 40))
    inputs = bf16_family.make_inputs(text, [random_image(64, 48, 3)])
    prefill, state = target.prefill(inputs)
    base = state.length
    tokens = [int(prefill.logits.argmax())] + [(17 * node + 5) % target.vocab_size for node in range(1, 9)]
    tree = branching_tree(tokens)
    tree_logits, _ = target.forward_tree(state, tree.tokens, tree.depths, tree.ancestor_mask())
    for node in range(len(tokens)):
        truncate_cache(state.cache, base)
        state.length = base
        for index in path_to(node):
            single, _ = target.forward_tree(
                state, tree.tokens[index : index + 1], torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
            )
        assert torch.equal(tree_logits[node], single[0]), f"node {node}"


@pytest.mark.parametrize("tree", [TreeParams(2, 1, 3), TreeParams(4, 3, 10), TreeParams(5, 4, 16)])
@pytest.mark.parametrize("drafter_kind", ["oracle_decoys", "msd_random"])
def test_speculative_matches_generate(bf16_family, tree, drafter_kind):
    # Speculative decoding in bfloat16 gives exactly transformers' generate on the same model.
    inputs = bf16_family.make_inputs(" ".join(CORPUS[:2]), [random_image(80, 60, 1)])
    max_new_tokens = 40
    expected = bf16_family.reference(inputs, max_new_tokens, eos_token_id=-1)
    if drafter_kind == "msd_random":
        torch.manual_seed(7)
        drafter = DraftModel(DraftConfig.for_target(bf16_family.target))
    else:
        plain = SpeculativeGenerator(bf16_family.target, None)
        continuation = plain.generate(inputs, max_new_tokens=max_new_tokens + tree.depth + 2, eos_token_ids=[])
        drafter = OracleDrafter(continuation.token_ids, bf16_family.target.vocab_size, decoys=2)
    output = SpeculativeGenerator(bf16_family.target, drafter, tree).generate(
        inputs, max_new_tokens=max_new_tokens, eos_token_ids=[]
    )
    assert output.token_ids == expected
    if drafter_kind == "oracle_decoys":
        assert output.stats.tau > 1.5  # the check covered multi-token verification forwards


def test_packed_draft_copy(bf16_llava):
    # The drafter's packed copy predicts what the draft does, shares the target's tensors, and leaves the draft as is.
    target = bf16_llava.target
    torch.manual_seed(4)
    draft = DraftModel(DraftConfig.for_target(target, draft_vocab_size=64)).attach(target)
    packed = draft.packed_copy()
    assert type(draft.fc) is nn.Linear
    assert type(packed.fc) is Int8Linear  # every width of this draft is a multiple of 16
    assert type(packed._shared["head_layer"]) is Int8Linear
    assert packed._shared["embed"] is draft._shared["embed"]
    tokens = torch.randint(0, target.vocab_size, (1, 5))
    features = torch.randn(1, 5, target.hidden_size, dtype=torch.bfloat16)
    positions = torch.arange(5).view(1, 1, 5)
    expected = draft.compute_logits(draft(tokens, features, positions))
    logits = packed.compute_logits(packed(tokens, features, positions))
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0.05)


def test_drafter_packs_own_copy(bf16_llava):
    # A float32 draft is copied once for the bfloat16 target, and the drafter packs that copy, not the caller's draft.
    target = bf16_llava.target
    draft = DraftModel(DraftConfig.for_target(target))
    drafter = MSDDrafter(draft, target)
    assert type(drafter.draft.fc) is Int8Linear
    assert drafter.draft.fc.weight.dtype == torch.bfloat16
    assert type(draft.fc) is nn.Linear
    assert draft.fc.weight.dtype == torch.float32


def test_large_tree_rejected(bf16_llava):
    # Forwards over more than ROWS tokens are not invariant, so such trees fail before decoding.
    draft = DraftModel(DraftConfig.for_target(bf16_llava.target))
    with pytest.raises(MSDError, match=f"--total-tokens {ROWS} or less .TreeParams.total_tokens"):
        SpeculativeGenerator(bf16_llava.target, draft, TreeParams(5, 8, ROWS + 1))
    SpeculativeGenerator(bf16_llava.target, None, TreeParams(5, 8, 48))  # plain decoding verifies no tree


def test_default_tree_fits(bf16_llava):
    # Without a tree, the Python API cuts the default so that the tree and the lookup fit what the kernels verify.
    draft = DraftModel(DraftConfig.for_target(bf16_llava.target))
    generator = SpeculativeGenerator(bf16_llava.target, draft)
    assert generator.tree.total_tokens == ROWS - TreeParams().lookup_tokens
    assert generator.tree.depth == TreeParams().depth


def test_bench_skips_prompt_lookup(bf16_llava):
    # transformers' prompt lookup checks its first candidates in the prompt's forward, so it cannot be exact here.
    methods = build_methods(bf16_llava.target, ["plain", "generate", "prompt-lookup"], TreeParams(2, 1, 3), {})
    inputs = bf16_llava.make_inputs("Hi", [random_image(40, 40, 2)])
    remaining, skipped = drop_unsupported(methods, inputs)
    assert [method.name for method in remaining] == ["plain", "generate"]
    assert skipped == {"prompt-lookup": FUSED_PROMPT_REASON}
    report = markdown_report({}, {"dtype": "torch.bfloat16", "skipped_methods": skipped})
    assert f"- skipped prompt-lookup: {FUSED_PROMPT_REASON}" in report


def test_default_prompt_lookup_skipped_quietly(bf16_llava, caplog):
    # A method the user named is skipped with a warning, one from the default list with an info line.
    methods = build_methods(bf16_llava.target, ["plain", "prompt-lookup"], TreeParams(2, 1, 3), {})
    inputs = bf16_llava.make_inputs("Hi", [random_image(40, 40, 2)])
    with caplog.at_level(logging.INFO, logger="msd.evaluate.method_setup"):
        drop_unsupported(methods, inputs, requested=False)
        drop_unsupported(methods, inputs, requested=True)
    levels = [record.levelno for record in caplog.records if "skipping prompt-lookup" in record.getMessage()]
    assert levels == [logging.INFO, logging.WARNING]


def test_tree_tuning_keeps_exact_sizes(bf16_llava):
    # --tune-tree times only tree sizes the kernels verify exactly, and raises when none is left.
    draft = DraftModel(DraftConfig.for_target(bf16_llava.target))
    inputs = bf16_llava.make_inputs("Hi", [random_image(40, 40, 2)])
    base = TreeParams(2, 2, 4)
    choice = tune_tree(bf16_llava.target, draft, inputs, base, sizes=[4, ROWS, 32], depths=[2], pilot_tokens=4)
    assert choice.params.total_tokens <= ROWS
    assert set(choice.forward_times) == {4, ROWS}
    with pytest.raises(MSDError, match="--tune-sizes"):
        tune_tree(bf16_llava.target, draft, inputs, base, sizes=[32, 48], depths=[2], pilot_tokens=4)


def test_tree_tuning_charges_grafted_cycles(bf16_llava, monkeypatch, caplog):
    # On a capped target the default sizes fit its limit with the lookup's tokens, so none is skipped. A candidate's
    # estimate charges the larger forward only in the pilot's share of grafted cycles.
    monkeypatch.setattr(tree_tuning, "time_target_forward", lambda target, inputs, sizes: {n: n * 1e-3 for n in sizes})
    monkeypatch.setattr(tree_tuning, "time_draft_proposal", lambda *args: {2: 0.0})
    draft = DraftModel(DraftConfig.for_target(bf16_llava.target))
    inputs = bf16_llava.make_inputs("Hi", [random_image(40, 40, 2)])
    base = TreeParams(2, 2, 4, lookup_tokens=4)
    with caplog.at_level(logging.WARNING):
        choice = tune_tree(bf16_llava.target, draft, inputs, base, depths=[2], pilot_tokens=12)
    assert set(choice.forward_times) == set(tree_tuning.CAPPED_SIZES)
    assert "skipped" not in caplog.text
    for candidate in choice.candidates:
        size, share = candidate["total_tokens"], candidate["graft_share"]
        cycle = ((1 - share) * size + share * (size + 4)) * 1e-3
        assert candidate["tokens_per_second"] == pytest.approx(candidate["tau"] / cycle)
    shares = [candidate["graft_share"] for candidate in choice.candidates]
    assert 0 < max(shares) < 1  # random models repeat themselves, but not from the first cycle
    # A limit below every default size leaves the limit itself to try.
    monkeypatch.setattr(bf16_llava.target, "max_tree_tokens", 4)
    choice = tune_tree(bf16_llava.target, draft, inputs, base, depths=[2], pilot_tokens=4)
    assert choice.params.total_tokens == 4


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    model, processor = build_llava(seed=3, dtype=torch.float32)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_load_target_bfloat16_only(saved_target):
    # bfloat16 on such a CPU gets the kernels. float32, and invariant_kernels=False with cpu_linear_rows=0, keep
    # PyTorch's layers.
    target = load_target(saved_target, dtype="bfloat16")
    assert isinstance(target.lm_head, InvariantLinear)
    assert target.max_tree_tokens == ROWS
    assert target.model.config.text_config._attn_implementation == batch_invariant.ATTENTION_NAME
    assert target.model.config.vision_config._attn_implementation == "sdpa"
    stock = load_target(saved_target, dtype="bfloat16", invariant_kernels=False, cpu_linear_rows=0)
    assert type(stock.lm_head) is nn.Linear
    assert stock.max_tree_tokens is None
    float32 = load_target(saved_target, dtype="float32", cpu_linear_rows=0)
    assert type(float32.lm_head) is nn.Linear
    assert float32.max_tree_tokens is None


def test_lmms_default_tree_fits(saved_target, tmp_path):
    # The lmms-eval model lowers its default tree to what the kernels verify, and a larger explicit tree still raises.
    lmms_plugin = pytest.importorskip("msd.evaluate.lmms_plugin")
    target = load_target(saved_target, dtype="bfloat16")
    DraftModel(DraftConfig.for_target(target)).save_pretrained(tmp_path / "draft")
    model = lmms_plugin.LlavaMSD(pretrained=str(saved_target), draft=str(tmp_path / "draft"), dtype="bfloat16")
    assert model.generator.tree.total_tokens == ROWS - TreeParams().lookup_tokens
    without_lookup = lmms_plugin.LlavaMSD(
        pretrained=str(saved_target), draft=str(tmp_path / "draft"), dtype="bfloat16", lookup_tokens="0"
    )
    assert without_lookup.generator.tree.total_tokens == ROWS
    with pytest.raises(MSDError, match="too large"):
        lmms_plugin.LlavaMSD(pretrained=str(saved_target), draft=str(tmp_path / "draft"), dtype="bfloat16",
                             total_tokens=ROWS + 1)


def test_cli_default_tree_fits(saved_target, tmp_path, capsys):
    # Without --total-tokens, msd generate lowers the default tree of 48 tokens so that it and the lookup's tokens fit
    # the 16 the kernels verify exactly.
    target = load_target(saved_target, dtype="bfloat16")
    DraftModel(DraftConfig.for_target(target)).save_pretrained(tmp_path / "draft")
    code = main([
        "generate", "--target", str(saved_target), "--draft", str(tmp_path / "draft"), "--dtype", "bfloat16",
        "--prompt", "Describe the picture", "--max-new-tokens", "6", "--compare", "--no-stream",
    ])
    assert code == 0
    code = main([
        "generate", "--target", str(saved_target), "--draft", str(tmp_path / "draft"), "--dtype", "bfloat16",
        "--prompt", "Hi", "--max-new-tokens", "2", "--total-tokens", str(ROWS + 1),
    ])
    assert code == 2
    assert f"Pass --total-tokens {ROWS} or less" in capsys.readouterr().err
    code = main([
        "generate", "--target", str(saved_target), "--draft", str(tmp_path / "draft"), "--dtype", "bfloat16",
        "--prompt", "Hi", "--max-new-tokens", "2", "--lookup-tokens", str(ROWS),
    ])
    assert code == 2
    assert "leaves no room for the draft's tree" in capsys.readouterr().err


def test_cli_full_tree_warns_lookup(saved_target, tmp_path, caplog):
    # An explicit tree that fills what the kernels verify leaves the lookup no room, and msd generate warns about it.
    target = load_target(saved_target, dtype="bfloat16")
    DraftModel(DraftConfig.for_target(target)).save_pretrained(tmp_path / "draft")
    code = main([
        "generate", "--target", str(saved_target), "--draft", str(tmp_path / "draft"), "--dtype", "bfloat16",
        "--prompt", "Hi", "--max-new-tokens", "2", "--total-tokens", str(ROWS), "--no-stream",
    ])
    assert code == 0
    assert "lookup gets as few as 0 of its 4 tokens" in caplog.text
    # A tree over the limit gets its own error, without the lookup warning first.
    caplog.clear()
    code = main([
        "generate", "--target", str(saved_target), "--draft", str(tmp_path / "draft"), "--dtype", "bfloat16",
        "--prompt", "Hi", "--max-new-tokens", "2", "--total-tokens", str(ROWS + 1), "--no-stream",
    ])
    assert code == 2
    assert "lookup gets" not in caplog.text


def test_switch_rejects_float32():
    model, _ = build_llava(seed=0, dtype=torch.float32)
    with pytest.raises(MSDError, match="bfloat16 weights"):
        use_batch_invariant_kernels(adapter_for(model))
