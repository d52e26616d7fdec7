"""The MSD draft: files, the fit check, visual slots, and the drafter's tree against sequential drafting."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from msd.decoding.drafter import MSDDrafter, depth_first
from msd.decoding.tree import DraftTree, TreeParams
from msd.draft import DraftConfig, DraftModel
from msd.errors import MSDError
from msd.train.loss import build_slots


def make_draft(target, seed=3, **options):
    torch.manual_seed(seed)
    return DraftModel(DraftConfig.for_target(target, **options)).attach(target)


def run_slots(draft, target, length=6, visual_at=(2, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = target.hidden_size
    tokens = torch.randint(0, target.vocab_size, (1, length), generator=generator)
    features = torch.randn(1, length, hidden, generator=generator, dtype=target.dtype)
    visual_embeds = torch.randn(1, length, hidden, generator=generator, dtype=target.dtype)
    visual_mask = torch.zeros(1, length, dtype=torch.bool)
    visual_mask[0, list(visual_at)] = True
    positions = torch.arange(length).view(1, 1, length).expand(draft.position_rows, 1, length)
    return tokens, features, positions, visual_embeds, visual_mask


@pytest.mark.parametrize("num_layers", [1, 3])
def test_save_load_round_trip(family, tmp_path, num_layers):
    draft = make_draft(family.target, num_layers=num_layers)
    tokens, features, positions, visual_embeds, visual_mask = run_slots(draft, family.target)
    before = draft(tokens, features, positions, visual_embeds=visual_embeds, visual_mask=visual_mask)
    draft.save_pretrained(tmp_path / "draft")
    loaded = DraftModel.from_pretrained(tmp_path / "draft").attach(family.target)
    after = loaded(tokens, features, positions, visual_embeds=visual_embeds, visual_mask=visual_mask)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    # The shared embedding and LM head are not part of the saved weights.
    assert not any("embed" in name or "head" in name for name in loaded.state_dict())
    assert loaded.config.num_layers == num_layers
    assert {name.split(".")[1] for name in loaded.state_dict() if name.startswith("layers.")} == {
        str(index) for index in range(num_layers)
    }


def test_legacy_draft_loads(llava_family, tmp_path):
    # Drafts saved by earlier msd versions name their decoder layer `layer.*`. They must load unchanged.
    draft = make_draft(llava_family.target)
    draft.save_pretrained(tmp_path / "draft")
    path = tmp_path / "draft" / "model.safetensors"
    weights = load_file(str(path))
    save_file({name.replace("layers.0.", "layer.", 1): tensor for name, tensor in weights.items()}, str(path))
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    del config["num_layers"]
    (tmp_path / "draft" / "config.json").write_text(json.dumps(config))
    loaded = DraftModel.from_pretrained(tmp_path / "draft").attach(llava_family.target)
    tokens, features, positions, visual_embeds, visual_mask = run_slots(draft, llava_family.target)
    torch.testing.assert_close(
        loaded(tokens, features, positions, visual_embeds=visual_embeds, visual_mask=visual_mask),
        draft(tokens, features, positions, visual_embeds=visual_embeds, visual_mask=visual_mask),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_invalid_layer_count_rejected(llava_family, value):
    # A draft needs at least one decoder layer, counted by a whole number.
    with pytest.raises(MSDError, match="num_layers"):
        DraftConfig.for_target(llava_family.target, num_layers=value)


def test_visual_slot_ignores_target_feature(llava_family):
    # At a visual slot the input is the projected visual embedding alone; the paired target feature must not matter.
    draft = make_draft(llava_family.target)
    tokens, features, positions, visual_embeds, visual_mask = run_slots(draft, llava_family.target, visual_at=(2,))
    base = draft(tokens, features, positions, visual_embeds=visual_embeds, visual_mask=visual_mask)
    changed = features.clone()
    changed[0, 2] += 1.0
    again = draft(tokens, changed, positions, visual_embeds=visual_embeds, visual_mask=visual_mask)
    torch.testing.assert_close(again[0, :3], base[0, :3], rtol=0, atol=0)
    # Changing the visual embedding does change the slot.
    moved = visual_embeds.clone()
    moved[0, 2] += 1.0
    third = draft(tokens, features, positions, visual_embeds=moved, visual_mask=visual_mask)
    assert not torch.allclose(third[0, 2], base[0, 2])


def test_ablation_fuses_visual_slots(llava_family):
    # With decouple_visual=False (the EAGLE-style ablation) the target feature at a visual slot is used.
    draft = make_draft(llava_family.target, decouple_visual=False)
    tokens, features, positions, visual_embeds, visual_mask = run_slots(draft, llava_family.target, visual_at=(2,))
    base = draft(tokens, features, positions, visual_embeds=visual_embeds, visual_mask=visual_mask)
    changed = features.clone()
    changed[0, 2] += 1.0
    again = draft(tokens, changed, positions, visual_embeds=visual_embeds, visual_mask=visual_mask)
    assert not torch.allclose(again[0, 2], base[0, 2])


def test_draft_for_other_family_rejected(llava_family, qwen_family):
    draft = DraftModel(DraftConfig.for_target(llava_family.target))
    with pytest.raises(MSDError, match="does not fit"):
        draft.attach(qwen_family.target)


def test_vocabulary_map_outside_target_rejected(llava_family):
    # A damaged draft_to_target entry is named before it could index past the target's LM head.
    target = llava_family.target
    draft = DraftModel(DraftConfig.for_target(target, draft_vocab_size=8))
    draft.draft_to_target[3] = target.vocab_size + 5
    with pytest.raises(MSDError, match=f"outside the target's vocabulary of {target.vocab_size}"):
        draft.attach(target)


def test_draft_with_other_hidden_size_rejected(llava_family):
    config = DraftConfig.for_target(llava_family.target)
    config.text_config = dict(config.text_config, hidden_size=32, intermediate_size=64)
    with pytest.raises(MSDError, match="hidden size 32"):
        config.check_fits(llava_family.target)


def test_load_errors(llava_family, tmp_path):
    with pytest.raises(MSDError, match="not found"):
        DraftModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MSDError, match="no draft config"):
        DraftModel.from_pretrained(tmp_path / "empty")
    (tmp_path / "research").mkdir()
    (tmp_path / "research" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(MSDError, match="msd convert"):
        DraftModel.from_pretrained(tmp_path / "research")


def test_draft_for_other_model_type_rejected(llava_family):
    # The same language model inside another vision-language model type is a different target.
    config = DraftConfig.for_target(llava_family.target)
    config.target_model_type = "qwen2_vl"
    with pytest.raises(MSDError, match="model type 'qwen2_vl' .target: 'llava'."):
        config.check_fits(llava_family.target)


def edited_config(folder, **changes):
    """Rewrite text_config entries of a saved draft's config.json."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["text_config"].update(changes)
    path.write_text(json.dumps(data))


def test_config_weight_mismatch_rejected(llava_family, tmp_path):
    # A config edited apart from its weights is named as such, not left to a state-dict traceback.
    make_draft(llava_family.target).save_pretrained(tmp_path / "draft")
    hidden = llava_family.target.hidden_size
    heads = llava_family.target.text_config.num_attention_heads
    edited_config(tmp_path / "draft", hidden_size=2 * hidden, head_dim=2 * hidden // heads)
    with pytest.raises(MSDError, match="do not match the sizes in its config: fc.bias"):
        DraftModel.from_pretrained(tmp_path / "draft")


def test_invalid_layer_config_rejected(llava_family, tmp_path):
    # A hidden size the attention heads do not divide is rejected by transformers, reported as an invalid config.
    make_draft(llava_family.target).save_pretrained(tmp_path / "draft")
    edited_config(tmp_path / "draft", hidden_size=llava_family.target.text_config.num_attention_heads * 8 + 1,
                  head_dim=None)
    with pytest.raises(MSDError, match="invalid draft config"):
        DraftModel.from_pretrained(tmp_path / "draft")


def test_corrupt_draft_config(llava_family, tmp_path):
    # A damaged config.json names the file and the commands that write it again.
    make_draft(llava_family.target).save_pretrained(tmp_path / "draft")
    (tmp_path / "draft" / "config.json").write_text('{"msd_draft": true, "num_layers": ')
    with pytest.raises(MSDError, match="invalid JSON in draft config .*msd train writes it"):
        DraftModel.from_pretrained(tmp_path / "draft")


def test_drafter_keeps_callers_draft(llava_family):
    # A float32 draft serving the float64 target keeps its float32 weights, so it can serve other targets unrounded.
    torch.manual_seed(2)
    draft = DraftModel(DraftConfig.for_target(llava_family.target))
    MSDDrafter(draft, llava_family.target)
    assert draft.fc.weight.dtype == torch.float32


def test_missing_weights_rejected(llava_family, tmp_path):
    draft = make_draft(llava_family.target)
    draft.save_pretrained(tmp_path / "draft")

    weights = load_file(str(tmp_path / "draft" / "model.safetensors"))
    del weights["fc.weight"]
    save_file(weights, str(tmp_path / "draft" / "model.safetensors"))
    with pytest.raises(MSDError, match="fc.weight"):
        DraftModel.from_pretrained(tmp_path / "draft")


@pytest.mark.parametrize("kept_bytes", [100, None])
def test_truncated_weights_rejected(llava_family, tmp_path, kept_bytes):
    # A partial copy of the weights file (cut inside the header, or halfway) gives an error that names the file.
    make_draft(llava_family.target).save_pretrained(tmp_path / "draft")
    weights = tmp_path / "draft" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: kept_bytes or len(data) // 2])
    with pytest.raises(MSDError, match="model.safetensors: the file is truncated or corrupt"):
        DraftModel.from_pretrained(tmp_path / "draft")


def sequential_logprobs(family, inputs, draft, path_tokens):
    """The draft's log-probs after drafting `path_tokens[1:]` one at a time from the root."""
    drafter = MSDDrafter(draft, family.target)
    prefill, state = family.target.prefill(inputs)
    drafter.start(prefill, state, path_tokens[0])
    for token in path_tokens[1:]:
        # update() with the draft's own feature is one sequential draft step.
        drafter.update(torch.tensor([token]), drafter.root_feature[None])
    return drafter.root_logprobs


@pytest.mark.parametrize(
    "tree, num_layers",
    [(TreeParams(3, 2, 12), 1), (TreeParams(4, 3, 10), 1), (TreeParams(3, 2, 12), 2)],
    ids=["full", "pruned", "full-two-layers"],
)
def test_drafter_tree_matches_sequential(family, images, tree, num_layers):
    # Each child in the proposed tree must be among the top-k of the draft's sequential prediction at its parent.
    # This checks the draft's tree attention mask, its positions and its cache handling (per layer).
    inputs = family.make_inputs("Describe it", images[:1])
    draft = make_draft(family.target, seed=5, num_layers=num_layers)
    drafter = MSDDrafter(draft, family.target)
    prefill, state = family.target.prefill(inputs)
    root = int(prefill.logits.argmax())
    drafter.start(prefill, state, root)
    proposed = drafter.propose(root, tree, max_depth=10)
    candidates = tree.top_k + (tree.depth - 1) * tree.top_k**2
    assert len(proposed) == min(tree.total_tokens, 1 + candidates)
    assert int(proposed.depths.max()) <= tree.depth
    if 1 + candidates <= tree.total_tokens:  # nothing pruned: the tree reaches full depth
        assert int(proposed.depths.max()) == tree.depth
    children = proposed.children()
    for node in range(len(proposed)):
        if not children[node]:
            continue
        path_tokens = proposed.tokens[proposed.path_to(node)].tolist()
        logprobs = sequential_logprobs(family, inputs, draft, path_tokens)
        top = set(logprobs.topk(tree.top_k).indices.tolist())
        assert set(children[node]) <= top, (node, path_tokens)


def eagle2_paths(family, inputs, draft, root, tree):
    """EAGLE-2's tree computed from sequential drafting: the token paths of the best `total_tokens - 1` candidates."""
    drafter = MSDDrafter(draft, family.target)
    prefill, state = family.target.prefill(inputs)
    drafter.start(prefill, state, root)
    to_target = drafter.vocabulary.to_target_ids

    def children(score, path):
        logprobs = sequential_logprobs(family, inputs, draft, [root, *path])
        scores, indices = logprobs.topk(tree.top_k)
        tokens = to_target(indices).tolist()
        return [(score + float(child), (*path, token)) for child, token in zip(scores, tokens)]

    frontier = children(0.0, ())
    candidates = list(frontier)
    for _ in range(1, tree.depth):
        grown = [child for score, path in frontier for child in children(score, path)]
        candidates += grown
        frontier = sorted(grown, reverse=True)[: tree.top_k]
    return {path for _, path in sorted(candidates, reverse=True)[: tree.total_tokens - 1]}


@pytest.mark.parametrize(
    "tree",
    [TreeParams(3, 2, 6, lookup_tokens=0), TreeParams(4, 3, 9, lookup_tokens=0), TreeParams(3, 30, 6, lookup_tokens=0)],
)
def test_drafter_tree_matches_eagle2(family, images, tree):
    # The proposed tree contains exactly the candidates EAGLE-2 selects when every score comes from drafting the path
    # one token at a time. This checks the cumulative scores, the frontier choice and the tree attention mask. With
    # a top-k above the tree's size the drafter expands only N - 1 nodes per step, which must select the same tree.
    inputs = family.make_inputs("Describe it", images[:1])
    draft = make_draft(family.target, seed=6)
    drafter = MSDDrafter(draft, family.target)
    prefill, state = family.target.prefill(inputs)
    root = int(prefill.logits.argmax())
    drafter.start(prefill, state, root)
    proposed = drafter.propose(root, tree, max_depth=10)
    paths = {tuple(proposed.tokens[proposed.path_to(node)[1:]].tolist()) for node in range(1, len(proposed))}
    assert paths == eagle2_paths(family, inputs, draft, root, tree)


def test_drafter_depth_capped_by_tree_size(llava_family, images, monkeypatch):
    # A 3-token tree has room for a path of two drafted tokens, so a depth of 5 runs one expansion step, not four.
    drafter = MSDDrafter(make_draft(llava_family.target, seed=5), llava_family.target)
    prefill, state = llava_family.target.prefill(llava_family.make_inputs("Describe it", images[:1]))
    root = int(prefill.logits.argmax())
    drafter.start(prefill, state, root)
    steps = []
    expand = drafter._feed_frontier
    monkeypatch.setattr(drafter, "_feed_frontier", lambda *args: steps.append(args[-1]) or expand(*args))
    proposed = drafter.propose(root, TreeParams(depth=5, top_k=1, total_tokens=3), max_depth=10)
    assert len(proposed) == 3
    assert steps == [1]


def test_config_omits_target_path(llava_family):
    # A saved draft must not carry the local folder its target was loaded from.
    llava_family.target.text_config._name_or_path = "/home/someone/models/target"
    try:
        config = DraftConfig.for_target(llava_family.target)
    finally:
        llava_family.target.text_config._name_or_path = ""
    assert "_name_or_path" not in config.text_config


def test_saved_draft_permissions(llava_family, tmp_path):
    # The weights are written under a temporary name and renamed. The file must not end up private to its owner.
    umask = os.umask(0o022)
    try:
        make_draft(llava_family.target).save_pretrained(tmp_path / "draft")
    finally:
        os.umask(umask)
    assert {stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "draft").iterdir()} == {0o644}


def test_depth_first_candidate_order():
    # Children keep their listed (best-first) order and each subtree follows its parent, so the first-listed path
    # from the root becomes nodes 1, 2, 3.
    parent_of = [-1, -1, 0, 0, 1, 2, 4]
    assert depth_first([0, 1, 2, 3, 4, 5], parent_of) == [0, 2, 5, 3, 1, 4]


def test_draft_path_file_or_weightless_rejected(llava_family, tmp_path):
    # A file passed as the draft, and a draft folder without its weights, each get an error naming the fix.
    (tmp_path / "draft.safetensors").write_bytes(b"")
    with pytest.raises(MSDError, match="is a file, not a folder"):
        DraftModel.from_pretrained(tmp_path / "draft.safetensors")
    make_draft(llava_family.target).save_pretrained(tmp_path / "draft")
    (tmp_path / "draft" / "model.safetensors").unlink()
    with pytest.raises(MSDError, match="Copy model.safetensors into the draft folder"):
        DraftModel.from_pretrained(tmp_path / "draft")


def test_drafter_slots_match_training_layout(family, images):
    # After start and one update, the drafter's root feature equals the draft's forward over the whole sequence laid
    # out by training's build_slots, so decoding gives each slot the token, feature, visual embedding and position
    # that training gives it.
    target = family.target
    inputs = family.make_inputs("Describe it", images[:1])
    drafter = MSDDrafter(make_draft(target, seed=5), target)
    prefill, state = target.prefill(inputs)
    first = int(prefill.logits.argmax())
    next_position = state.next_position
    drafter.start(prefill, state, first)

    tree = DraftTree.chain([first, 11, 12])
    logits, hidden = target.forward_tree(state, tree.tokens, tree.depths, tree.ancestor_mask())
    target.keep_accepted(state, len(tree), torch.arange(3))
    bonus = int(logits[2].argmax())
    drafter.update(torch.tensor([11, 12, bonus]), hidden)

    hidden_size = target.hidden_size
    generated_positions = torch.arange(next_position, next_position + 4).expand(prefill.positions.shape[0], 4)
    batch = {
        "input_ids": torch.cat([prefill.input_ids, torch.tensor([first, 11, 12, bonus])])[None],
        "hidden_states": torch.cat([prefill.hidden_states, hidden, torch.zeros(1, hidden_size)])[None],
        "visual_embeds": torch.cat([prefill.inputs_embeds, torch.zeros(4, hidden_size)])[None],
        "visual_mask": torch.cat([prefill.visual_mask, torch.zeros(4, dtype=torch.bool)])[None],
        "position_ids": torch.cat([prefill.positions, generated_positions], dim=1)[:, None],
        "attention_mask": torch.ones(1, prefill.input_ids.shape[0] + 4, dtype=torch.long),
        "loss_mask": torch.ones(1, prefill.input_ids.shape[0] + 4, dtype=torch.long),
    }
    assert prefill.visual_mask.any()  # the layout covers visual slots
    slots = build_slots(batch)
    with torch.no_grad():
        expected = drafter.draft(
            slots.token_ids,
            slots.features,
            slots.position_ids,
            visual_embeds=slots.visual_embeds,
            visual_mask=slots.visual_mask,
        )[0, -1]
    torch.testing.assert_close(drafter.root_feature, expected)


def test_frontier_logprobs_match_sequential(family, images, monkeypatch):
    # Every node the drafter expands gets the log-probabilities that drafting its path one token at a time gives.
    # Top-k membership (test_drafter_tree_matches_sequential) is too coarse for a random draft, because a wrong parent
    # feature rarely changes which tokens rank in its top k.
    inputs = family.make_inputs("Describe it", images[:1])
    draft = make_draft(family.target, seed=5)
    drafter = MSDDrafter(draft, family.target)
    prefill, state = family.target.prefill(inputs)
    root = int(prefill.logits.argmax())
    drafter.start(prefill, state, root)

    fed = {}  # candidate index -> (target token, parent candidate, draft output)
    expand = drafter._feed_frontier

    def recording_expand(frontier, tokens, features, parent_of, fed_slot, step):
        hidden = expand(frontier, tokens, features, parent_of, fed_slot, step)
        token_ids = drafter.vocabulary.to_target_ids(tokens).tolist()
        for row, candidate in enumerate(frontier):
            fed[candidate] = (token_ids[row], parent_of[candidate], hidden[row])
        return hidden

    monkeypatch.setattr(drafter, "_feed_frontier", recording_expand)
    drafter.propose(root, TreeParams(4, 3, 40, lookup_tokens=0), max_depth=10)
    assert len(fed) == 3 * 3  # three expansion steps of three nodes
    for token, parent, hidden in fed.values():
        path = [token]
        while parent >= 0:
            path.insert(0, fed[parent][0])
            parent = fed[parent][1]
        logprobs = torch.log_softmax(drafter.vocabulary.logits(hidden).float(), dim=-1)
        torch.testing.assert_close(logprobs, sequential_logprobs(family, inputs, draft, [root, *path]))


def test_drafter_tree_respects_max_depth(llava_family, images):
    # Near the context limit the loop allows fewer levels than the tree's depth, and no drafted node may go deeper.
    drafter = MSDDrafter(make_draft(llava_family.target, seed=5), llava_family.target)
    prefill, state = llava_family.target.prefill(llava_family.make_inputs("Describe it", images[:1]))
    root = int(prefill.logits.argmax())
    drafter.start(prefill, state, root)
    for max_depth in (0, 2):
        proposed = drafter.propose(root, TreeParams(4, 2, 12, lookup_tokens=0), max_depth=max_depth)
        assert int(proposed.depths.max()) == max_depth
