"""Research-format (EAGLE-style) draft checkpoints convert to msd drafts that generate like directly built ones."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftConfig, DraftModel
from msd.draft.convert import convert_checkpoint, weight_name_map
from msd.cli import main
from msd.errors import MSDError
from msd.targets import load_target
from tiny_models import llava_inputs, random_image
from train_helpers import tiny_target

TREE = TreeParams(depth=3, top_k=3, total_tokens=8)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def research_state(draft: DraftModel, target) -> dict[str, torch.Tensor]:
    """The draft's weights under research names, with the embedding copy research checkpoints carry."""
    state = draft.state_dict()
    research = {research: state[name].clone() for name, research in weight_name_map(draft).items()}
    research["embed_tokens.weight"] = target.embed_tokens.weight.detach().clone()
    return research


def write_research(folder, draft, target, pickled: bool, drop: str | None = None):
    folder.mkdir()
    text = target.text_config
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": text.hidden_size,
              "intermediate_size": text.intermediate_size, "num_attention_heads": text.num_attention_heads,
              "num_key_value_heads": text.num_key_value_heads, "vocab_size": text.vocab_size}
    (folder / "config.json").write_text(json.dumps(config))
    state = research_state(draft, target)
    if drop:
        del state[drop]
    if pickled:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))


def random_draft(target, input_layernorm: bool) -> DraftModel:
    torch.manual_seed(3)
    draft = DraftModel(DraftConfig.for_target(target, input_layernorm=input_layernorm))
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.normal_(0, 0.05)
    return draft.to(target.dtype)


@pytest.mark.parametrize("pickled", [False, True])
@pytest.mark.parametrize("input_layernorm", [False, True])
def test_convert_generates_identically(tmp_path, target, pickled, input_layernorm):
    direct = random_draft(target, input_layernorm)
    write_research(tmp_path / "research", direct, target, pickled)

    convert_checkpoint(tmp_path / "research", tmp_path / "msd", target.config)
    converted = DraftModel.from_pretrained(tmp_path / "msd")

    assert converted.config.input_layernorm == input_layernorm
    inputs = llava_inputs(target.processor, "What is in this image?", [random_image(48, 40)])
    expected = SpeculativeGenerator(target, direct, TREE).generate(inputs, max_new_tokens=12)
    actual = SpeculativeGenerator(target, converted, TREE).generate(inputs, max_new_tokens=12)
    assert actual.token_ids == expected.token_ids
    assert actual.stats.accepted_lengths == expected.stats.accepted_lengths


def test_convert_keeps_float16_weights(tmp_path, target):
    # A float16 research checkpoint stays float16 on disk rather than doubling in size, with the same values.
    direct = random_draft(target, input_layernorm=True).to(torch.float16)
    write_research(tmp_path / "research", direct, target, pickled=False)

    convert_checkpoint(tmp_path / "research", tmp_path / "msd", target.config)
    saved = load_file(str(tmp_path / "msd" / "model.safetensors"))

    for name, tensor in direct.state_dict().items():
        assert saved[name].dtype == torch.float16, name
        assert torch.equal(saved[name], tensor), name


def test_convert_mixed_precision_keeps_float32(tmp_path, target):
    # float32 norms beside float16 projections are not rounded to float16: the draft is saved in float32.
    direct = random_draft(target, input_layernorm=True).to(torch.float16)
    for name, parameter in direct.named_parameters():
        if "norm" in name:
            parameter.data = parameter.data.float() + 1e-4
    write_research(tmp_path / "research", direct, target, pickled=False)

    convert_checkpoint(tmp_path / "research", tmp_path / "msd", target.config)
    saved = load_file(str(tmp_path / "msd" / "model.safetensors"))

    for name, tensor in direct.state_dict().items():
        assert saved[name].dtype == torch.float32, name
        assert torch.equal(saved[name], tensor.float()), name


def test_convert_missing_weight_raises(tmp_path, target):
    write_research(tmp_path / "research", random_draft(target, True), target, False, drop="layers.0.mlp.up_proj.weight")
    with pytest.raises(MSDError, match="layers.0.mlp.up_proj.weight"):
        convert_checkpoint(tmp_path / "research", tmp_path / "msd", target.config)


def test_convert_unknown_weight_raises(tmp_path, target):
    folder = tmp_path / "research"
    write_research(folder, random_draft(target, True), target, False)
    state = research_state(random_draft(target, True), target)
    state["layers.1.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(MSDError, match="layers.1.mlp.up_proj.weight"):
        convert_checkpoint(folder, tmp_path / "msd", target.config)


def test_convert_other_target_raises(tmp_path, target):
    folder = tmp_path / "research"
    write_research(folder, random_draft(target, True), target, False)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 4096
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MSDError, match="hidden_size 4096"):
        convert_checkpoint(folder, tmp_path / "msd", target.config)


def test_convert_other_vocabulary_raises(tmp_path, target):
    # The config's shapes fit, but the embedding copy has one more row, as in a draft trained for another tokenizer.
    folder = tmp_path / "research"
    write_research(folder, random_draft(target, True), target, False)
    state = research_state(random_draft(target, True), target)
    embedding = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = torch.cat([embedding, embedding[:1]])
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(MSDError, match="the embedding in .* has shape"):
        convert_checkpoint(folder, tmp_path / "msd", target.config)


def test_convert_rejects_pickled_code(tmp_path, target):
    folder = tmp_path / "research"
    write_research(folder, random_draft(target, True), target, True)
    torch.save({"fc.weight": torch.zeros(1), "payload": object()}, folder / "pytorch_model.bin")
    with pytest.raises(MSDError, match="cannot read"):
        convert_checkpoint(folder, tmp_path / "msd", target.config)


def test_convert_missing_files_raise(tmp_path, target):
    # A hub id or a missing folder is named as such, then an empty folder and one without weights.
    with pytest.raises(MSDError, match="checkpoint folder not found: lucylyn/MSD-LLaVA1.5-7B.*hf download"):
        convert_checkpoint("lucylyn/MSD-LLaVA1.5-7B", tmp_path / "msd", target.config)
    with pytest.raises(MSDError, match="no config.json"):
        convert_checkpoint(tmp_path, tmp_path / "msd", target.config)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MSDError, match="no weights"):
        convert_checkpoint(tmp_path, tmp_path / "msd", target.config)


def test_original_llava_format_target_raises(tmp_path, capsys):
    # A target in the original LLaVA repository's format is named as such, before transformers' default sizes appear
    # in a shape error.
    folder = tmp_path / "llava-v1.5-7b"
    folder.mkdir()
    original = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": 4096,
                "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    (folder / "config.json").write_text(json.dumps(original))
    code = main(["convert", "--checkpoint", str(tmp_path), "--target", str(folder), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "original LLaVA repository's format" in capsys.readouterr().err
    with pytest.raises(MSDError, match="original LLaVA repository's format.*llava-hf/llava-1.5-7b-hf"):
        load_target(folder)
