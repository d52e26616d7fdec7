"""Target adapters: tree forward against sequential decoding, M-RoPE positions and KV-cache trimming."""

import torch

from msd.decoding.tree import DraftTree


def sequential_logits(target, inputs, tokens):
    """Logits after each of `tokens`, decoding them one at a time on a fresh cache: (len(tokens), V)."""
    _, state = target.prefill(inputs)
    rows = []
    for token in tokens:
        logits, _ = target.forward_tree(state, torch.tensor([token]), torch.tensor([0]), torch.ones(1, 1, dtype=bool))
        rows.append(logits[0])
    return torch.stack(rows)


def branching_tree_logits(target, inputs) -> tuple[DraftTree, torch.Tensor]:
    """Verify a fixed branching tree after the prompt; return the tree and its logits (n, V)."""
    prefill, state = target.prefill(inputs)
    root = int(prefill.logits.argmax())
    tree = DraftTree(tokens=torch.tensor([root, 11, 12, 13, 14, 15]), parents=torch.tensor([-1, 0, 0, 1, 2, 3]))
    logits, _ = target.forward_tree(state, tree.tokens, tree.depths, tree.ancestor_mask())
    return tree, logits


def test_tree_forward_matches_sequential(family, images):
    # Every root-to-node path of a branching tree must get the logits that decoding that path alone would give.
    inputs = family.make_inputs("Describe it", images[:2])
    target = family.target
    tree, logits = branching_tree_logits(target, inputs)
    for node in range(len(tree)):
        path_tokens = tree.tokens[tree.path_to(node)].tolist()
        expected = sequential_logits(target, inputs, path_tokens)[-1]
        torch.testing.assert_close(logits[node], expected, rtol=1e-9, atol=1e-9)


def test_keep_accepted_equals_sequential_cache(family, images):
    # After keeping a non-leading path (root, node 2, node 4), the next token's logits match sequential decoding.
    inputs = family.make_inputs("Describe it", images[:1])
    target = family.target
    prefill, state = target.prefill(inputs)
    root = int(prefill.logits.argmax())
    tree = DraftTree(tokens=torch.tensor([root, 11, 12, 13, 14]), parents=torch.tensor([-1, 0, 0, 1, 2]))
    target.forward_tree(state, tree.tokens, tree.depths, tree.ancestor_mask())
    target.keep_accepted(state, len(tree), torch.tensor([0, 2, 4]))
    assert state.length == prefill.input_ids.shape[0] + 3
    assert state.cache.get_seq_length() == state.length

    logits, _ = target.forward_tree(state, torch.tensor([20]), torch.tensor([0]), torch.ones(1, 1, dtype=bool))
    expected = sequential_logits(target, inputs, [root, 12, 14, 20])[-1]
    torch.testing.assert_close(logits[0], expected, rtol=1e-9, atol=1e-9)


def test_qwen_positions_after_image(qwen_family, images):
    # Text after an image continues from the largest position id, so generated positions run behind the cache index.
    target = qwen_family.target
    inputs = qwen_family.make_inputs("What is it?", images[:2])
    prefill, state = target.prefill(inputs)
    expected, deltas = qwen_family.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    assert torch.equal(prefill.positions, expected[:, 0])
    assert state.position_offset == int(deltas.view(-1)[0])
    assert state.position_offset < 0
    assert state.next_position == int(prefill.positions.max()) + 1
    # Image rows differ between temporal, height and width; text rows agree.
    visual = prefill.visual_mask
    assert not torch.equal(prefill.positions[1, visual], prefill.positions[2, visual])
    assert torch.equal(prefill.positions[0, ~visual], prefill.positions[2, ~visual])


def test_qwen_positions_across_cycles(qwen_family, images):
    # After accepting k tokens, the next position is the old one plus k, in all three rows.
    target = qwen_family.target
    inputs = qwen_family.make_inputs("What is it?", images[:1])
    prefill, state = target.prefill(inputs)
    start = state.next_position
    tree = DraftTree.chain([int(prefill.logits.argmax()), 5, 6, 7])
    target.forward_tree(state, tree.tokens, tree.depths, tree.ancestor_mask())
    target.keep_accepted(state, len(tree), torch.tensor([0, 1]))
    assert state.next_position == start + 2
    assert target.generated_positions(state, 2).tolist() == [[start + 2, start + 3]] * 3


def test_visual_mask_matches_image_tokens(family, images):
    inputs = family.make_inputs("What is it?", images)
    prefill, _ = family.target.prefill(inputs)
    assert torch.equal(prefill.visual_mask, inputs["input_ids"][0] == family.target.image_token_id)
    assert prefill.visual_mask.sum() > 0
    # Visual positions hold projected image features, not the placeholder's token embedding.
    placeholder = family.target.embed_tokens.weight[family.target.image_token_id]
    assert not torch.allclose(prefill.inputs_embeds[prefill.visual_mask][0], placeholder)


def test_prefill_hidden_states_match_model(family, images):
    # Hidden states after the final norm equal the model's own forward with the images.
    inputs = family.make_inputs("What is it?", images[:2])
    prefill, _ = family.target.prefill(inputs)
    with torch.no_grad():
        output = family.model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(prefill.logits, output.logits[0, -1].float(), rtol=1e-9, atol=1e-9)
    head = family.target.lm_head
    torch.testing.assert_close(head(prefill.hidden_states), output.logits[0], rtol=1e-9, atol=1e-9)


def model_logits(family, inputs, tokens):
    """The model's own forward over the prompt with `tokens` appended: logits after the last token, (V,)."""
    extended = dict(inputs)
    appended = torch.tensor([tokens])
    extended["input_ids"] = torch.cat([inputs["input_ids"], appended], dim=1)
    if "attention_mask" in inputs:
        extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(appended)], dim=1)
    if "mm_token_type_ids" in inputs:
        extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(appended)], dim=1)
    with torch.no_grad():
        return family.model(**extended).logits[0, -1]


def test_tree_forward_matches_model_forward(family, images):
    # Each node's logits equal the model's own forward over the prompt and the node's path. The comparison with
    # sequential_logits above shares forward_tree's positions, so only this one checks them, such as Qwen2-VL's rope
    # offset after images. The tiny models rarely change a greedy token when positions shift, so logits are compared.
    inputs = family.make_inputs("Describe it", images[:2])
    tree, logits = branching_tree_logits(family.target, inputs)
    for node in range(len(tree)):
        path_tokens = tree.tokens[tree.path_to(node)].tolist()
        torch.testing.assert_close(logits[node], model_logits(family, inputs, path_tokens), rtol=1e-9, atol=1e-9)
