"""The training loop: exact resume, checkpoints loadable by msd generate, rotation, and input errors."""

import copy
import json
import math
import os
import re
import shutil
import stat

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from msd.cli import main
from msd.data import FeatureDataset
from msd.decoding import SpeculativeGenerator, TreeParams
from msd.draft import DraftConfig, DraftModel
from msd.errors import MSDError
from msd.evaluate.method_setup import check_draft_kind
from msd.train import CurriculumConfig, DraftTrainer, TrainConfig
from msd.train.config import load_train_config
from msd.train.trainer import _Progress
from msd.train.checkpoint import find_resume_checkpoint, list_checkpoints
from msd.train.curriculum import CurriculumPosition
from msd.train.loss import LossConfig
from msd.targets import adapter_for
from tiny_models import llava_inputs, random_image
from train_helpers import prepare_folder, tiny_sources, tiny_target


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_sources(tmp_path_factory.mktemp("features"), 8, 4, answer_tokens=10)


def config(**options) -> TrainConfig:
    values = dict(epochs=4, micro_batch_size=2, gradient_accumulation=2, learning_rate=1e-3, warmup_steps=2,
                  mixed_precision="no", save_every=0, save_each_epoch=True, eval_samples=0, log_every=1,
                  curriculum=CurriculumConfig(text_only=1, ramp=2, ramp_start=0.5, ramp_end=0.5))
    values.update(options)
    return TrainConfig(**values)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_decodes_like_plain(target, draft, tree: TreeParams) -> None:
    """Decode a photo prompt with the draft and check the tokens equal plain greedy decoding's."""
    inputs = llava_inputs(target.processor, "What is in this image?", [random_image(48, 40)])
    plain = SpeculativeGenerator(target, None).generate(inputs, max_new_tokens=8)
    drafted = SpeculativeGenerator(target, draft, tree).generate(inputs, max_new_tokens=8)
    assert drafted.token_ids == plain.token_ids


def test_resume_matches_uninterrupted_run(tmp_path, setup):
    target, text, vision = setup
    full = DraftTrainer(config(), target, text, vision, tmp_path / "full").train()
    curriculum = DraftTrainer(config(), target, text, vision, tmp_path / "x").curriculum
    epoch_starts = curriculum.epoch_starts(4)
    # A step inside an epoch, so the resume continues a partly read plan.
    middle = next(step for step in range(1, epoch_starts[-1]) if step not in epoch_starts)

    DraftTrainer(config(save_every=middle), target, text, vision, tmp_path / "split").train(stop_at_step=middle)
    checkpoint = list_checkpoints(tmp_path / "split")[-1]
    assert checkpoint.name.endswith(f"{middle:08d}")
    assert json.loads((checkpoint / "trainer_state.json").read_text())["position"]["step_in_epoch"] > 0
    resumed = DraftTrainer(config(save_every=middle), target, text, vision, tmp_path / "split").train(resume=True)

    expected, actual = weights(full), weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resume_with_other_batch_geometry_raises(tmp_path, setup):
    target, text, vision = setup
    DraftTrainer(config(), target, text, vision, tmp_path).train(stop_at_step=2)
    with pytest.raises(MSDError, match="draws_per_step"):
        DraftTrainer(config(micro_batch_size=1), target, text, vision, tmp_path).train(resume=True)


def test_resume_with_changed_options_warns(tmp_path, setup, caplog):
    # Options that do not change the sample order may change on resume, and the log names each one.
    target, text, vision = setup
    DraftTrainer(config(), target, text, vision, tmp_path).train(stop_at_step=2)
    changed = config(loss=LossConfig(unroll_steps=2), learning_rate=2e-3)
    with caplog.at_level("WARNING"):
        DraftTrainer(changed, target, text, vision, tmp_path).train(resume=True)
    assert "loss.unroll_steps: 1 -> 2" in caplog.text
    assert "learning_rate: 0.001 -> 0.002" in caplog.text


def test_resume_with_other_sample_order_raises(tmp_path, setup):
    # Held-out samples change the training sources, so the saved epoch position no longer fits: an error, not a
    # resume that skips, repeats or never finishes the epoch.
    target, text, vision = setup
    DraftTrainer(config(save_every=1), target, text, vision, tmp_path).train(stop_at_step=1)
    with pytest.raises(MSDError, match="rest of its epoch would come in another order.*eval_samples"):
        DraftTrainer(config(save_every=1, eval_samples=1), target, text, vision, tmp_path).train(resume=True)


def test_fresh_run_beside_checkpoints_raises(tmp_path, setup):
    # A second run without --resume in the same folder would rotate out the first run's checkpoints.
    target, text, vision = setup
    DraftTrainer(config(), target, text, vision, tmp_path).train(stop_at_step=2)
    with pytest.raises(MSDError, match="Pass --resume"):
        DraftTrainer(config(), target, text, vision, tmp_path).train()
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-00000002"]


def test_more_epochs_on_resume(tmp_path, setup):
    # A finished run trains on for more epochs when its curriculum stages are explicit. With stages derived from
    # --epochs, the finished epochs would get other lengths, and the resume stops with an error.
    target, text, vision = setup
    DraftTrainer(config(), target, text, vision, tmp_path / "explicit").train()
    longer = DraftTrainer(config(epochs=5), target, text, vision, tmp_path / "explicit")
    longer.train(resume=True)
    state = json.loads((list_checkpoints(tmp_path / "explicit")[-1] / "trainer_state.json").read_text())
    assert state["step"] == longer.total_steps
    assert state["position"]["epoch"] == 5

    derived = CurriculumConfig()  # epochs 2: one text epoch of 2 steps, then one multimodal epoch of 1 step
    DraftTrainer(config(epochs=2, curriculum=derived), target, text, vision, tmp_path / "derived").train()
    with pytest.raises(MSDError, match="finished epochs would have taken 4 steps, not 3"):
        DraftTrainer(config(epochs=4, curriculum=derived), target, text, vision, tmp_path / "derived").train(
            resume=True
        )


def test_resume_inside_epoch_with_unchanged_plan(tmp_path, setup):
    # Inside an epoch, options may change when the rest of the epoch draws the same samples: more epochs during the
    # text-only stage. A change of the current epoch's multimodal share stops the resume.
    target, text, vision = setup
    derived = CurriculumConfig()  # 4 epochs: text only for 2; 6 epochs: text only for 3
    DraftTrainer(config(curriculum=derived, save_every=1), target, text, vision, tmp_path / "text").train(
        stop_at_step=1
    )
    longer = DraftTrainer(config(epochs=6, curriculum=derived, save_every=1), target, text, vision, tmp_path / "text")
    assert longer.train(resume=True).name == "draft"

    single = dict(micro_batch_size=1, gradient_accumulation=1, save_every=1)  # epoch 1: 8 steps, epoch 2: 6 steps
    ramp = CurriculumConfig(text_only=1, ramp=2, ramp_start=0.5, ramp_end=0.5)
    DraftTrainer(config(curriculum=ramp, **single), target, text, vision, tmp_path / "ramp").train(stop_at_step=10)
    steeper = CurriculumConfig(text_only=1, ramp=2, ramp_start=0.9, ramp_end=0.9)
    with pytest.raises(MSDError, match="rest of its epoch would come in another order"):
        DraftTrainer(config(curriculum=steeper, **single), target, text, vision, tmp_path / "ramp").train(resume=True)


def test_resume_with_other_process_count_raises(tmp_path, setup):
    # The same samples per step from another number of processes would restore another process's RNG states.
    target, text, vision = setup
    DraftTrainer(config(), target, text, vision, tmp_path).train(stop_at_step=2)
    state_file = list_checkpoints(tmp_path)[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["processes"] = 2
    state_file.write_text(json.dumps(state))
    with pytest.raises(MSDError, match="processes 2"):
        DraftTrainer(config(), target, text, vision, tmp_path).train(resume=True)


def test_resume_before_later_checkpoints_raises(tmp_path, setup):
    # Resuming an older checkpoint beside later ones would mix two runs, and rotation would delete the new one.
    target, text, vision = setup
    DraftTrainer(config(save_every=1, keep_checkpoints=3), target, text, vision, tmp_path).train(stop_at_step=3)
    first = list_checkpoints(tmp_path)[0]
    with pytest.raises(MSDError, match="later checkpoints"):
        DraftTrainer(config(save_every=1, keep_checkpoints=3), target, text, vision, tmp_path).train(resume=first)
    assert len(list_checkpoints(tmp_path)) == 3


def test_init_draft_keeps_its_precision(tmp_path, setup):
    # Next to a bfloat16 target, a float32 draft to start from keeps its weights unrounded.
    target, text, _ = setup
    bf16_target = adapter_for(copy.deepcopy(target.model).to(torch.bfloat16), target.processor)
    start = DraftModel(DraftConfig.for_target(target))
    with torch.no_grad():
        start.fc.weight.fill_(1 + 2**-12)  # not a bfloat16 value
    trainer = DraftTrainer(config(), bf16_target, text, None, tmp_path, draft=copy.deepcopy(start))
    assert trainer.draft.fc.weight.dtype == torch.float32
    assert torch.equal(trainer.draft.fc.weight, start.fc.weight)


def test_run_inside_text_stage_warns(tmp_path, setup, caplog):
    # A text-only stage longer than the run leaves the vision data unused, for example the research config's 20
    # text-only epochs with --epochs 4. A run that reaches the ramp does not warn.
    target, text, vision = setup
    with caplog.at_level("WARNING"):
        DraftTrainer(config(curriculum=CurriculumConfig(text_only=20, ramp=19)), target, text, vision, tmp_path)
    assert "--vision-data is not used" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        DraftTrainer(config(), target, text, vision, tmp_path)
        DraftTrainer(config(max_steps=2), target, text, None, tmp_path)
    assert "--vision-data is not used" not in caplog.text
    with caplog.at_level("WARNING"):
        DraftTrainer(config(max_steps=2), target, text, vision, tmp_path)  # the first epoch is text only
    assert "--vision-data is not used" in caplog.text


def test_skipped_optimizer_steps_keep_schedule(tmp_path, setup, monkeypatch):
    # float16's loss scaler skips optimizer steps with inf gradients, and the learning-rate schedule waits for them.
    target, text, vision = setup
    trainer = DraftTrainer(config(), target, text, vision, tmp_path / "run")
    trainer.train(stop_at_step=2)
    assert trainer.scheduler.last_epoch == 2
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    skipping = DraftTrainer(config(), target, text, vision, tmp_path / "skipped")
    skipping.train(stop_at_step=2)
    assert skipping.scheduler.last_epoch == 0


def test_long_warmup_warns(tmp_path, setup, caplog):
    # A warm-up as long as the run never reaches the peak learning rate.
    target, text, vision = setup
    with caplog.at_level("WARNING"):
        DraftTrainer(config(warmup_steps=1000), target, text, vision, tmp_path)
    assert "Lower --warmup-steps" in caplog.text


def test_checkpoints_load_and_rotate(tmp_path, setup):
    target, text, vision = setup
    final = DraftTrainer(config(save_every=1, keep_checkpoints=2), target, text, vision, tmp_path).train()

    checkpoints = list_checkpoints(tmp_path)
    assert len(checkpoints) == 2
    assert not list(tmp_path.glob(".*partial"))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["position"]["epoch"] == 4
    draft = DraftModel.from_pretrained(checkpoints[-1] / "draft")
    assert torch.equal(draft.fc.weight, DraftModel.from_pretrained(final).fc.weight)

    assert_decodes_like_plain(target, draft, TreeParams(depth=3, top_k=3, total_tokens=8))


def test_checkpoint_of_same_step_replaced(tmp_path, setup):
    # Saving a step again replaces its checkpoint and leaves no hidden folder behind.
    target, text, vision = setup
    trainer = DraftTrainer(config(save_every=1), target, text, vision, tmp_path)
    trainer.train(stop_at_step=1)
    (list_checkpoints(tmp_path)[0] / "marker").write_text("first")
    trainer._save(_Progress(step=1, position=CurriculumPosition(step_in_epoch=1)))
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-00000001"]
    assert not (list_checkpoints(tmp_path)[0] / "marker").exists()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_interrupted_replacement_recovered(tmp_path, setup):
    # A kill between the two renames of a same-step save leaves the old checkpoint under its .replaced name and the
    # complete new one under its .partial name. --resume finds the new one under the step's name.
    target, text, vision = setup
    DraftTrainer(config(save_every=1), target, text, vision, tmp_path).train(stop_at_step=1)
    final = list_checkpoints(tmp_path)[0]
    shutil.copytree(final, tmp_path / f".{final.name}.partial")
    (tmp_path / f".{final.name}.partial" / "marker").write_text("new")
    final.rename(tmp_path / f".{final.name}.replaced")
    assert find_resume_checkpoint(True, tmp_path) == final
    assert (final / "marker").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_checkpoint_file_permissions(tmp_path, setup):
    # accelerate writes the state's weights readable by their owner only. The checkpoint must follow the umask.
    target, text, vision = setup
    umask = os.umask(0o022)
    try:
        DraftTrainer(config(epochs=1), target, text, vision, tmp_path).train()
    finally:
        os.umask(umask)
    checkpoint = list_checkpoints(tmp_path)[-1]
    modes = {path.relative_to(checkpoint).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in checkpoint.rglob("*") if path.is_file()}
    assert "state/model.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes


def test_ablation_draft_trains_without_decoupling(tmp_path, setup):
    # decouple_visual=False trains the EAGLE-style ablation: saved as such, accepted by bench's eagle method only,
    # and lossless like any draft
    target, text, vision = setup
    final = DraftTrainer(config(epochs=1, decouple_visual=False), target, text, vision, tmp_path).train()
    draft = DraftModel.from_pretrained(final)
    assert draft.config.decouple_visual is False
    check_draft_kind("eagle", draft)
    with pytest.raises(MSDError, match="decouple_visual"):
        check_draft_kind("msd", draft)

    assert_decodes_like_plain(target, draft, TreeParams(depth=3, top_k=2, total_tokens=6))


def test_cli_flag_trains_the_ablation(tmp_path, setup):
    # `msd train --no-decouple-visual` reaches the fresh draft's config; without the flag the draft is decoupled
    target, text, vision = setup
    target.model.save_pretrained(tmp_path / "target")
    target.processor.save_pretrained(tmp_path / "target")
    common = ["train", "--target", str(tmp_path / "target"), "--text-data", str(text.folder),
              "--vision-data", str(vision.folder), "--epochs", "1", "--micro-batch-size", "2", "--mixed-precision", "no",
              "--eval-samples", "0", "--warmup-steps", "1"]
    assert main(common + ["--output", str(tmp_path / "eagle"), "--no-decouple-visual"]) == 0
    assert main(common + ["--output", str(tmp_path / "msd")]) == 0
    assert DraftModel.from_pretrained(tmp_path / "eagle" / "draft").config.decouple_visual is False
    assert DraftModel.from_pretrained(tmp_path / "msd" / "draft").config.decouple_visual is True


def test_cli_trains_two_layer_draft(tmp_path, setup):
    # `msd train --draft-layers 2` builds a fresh two-layer draft that decodes losslessly. Starting from that draft
    # with another layer count raises instead of ignoring the option.
    target, text, vision = setup
    target.model.save_pretrained(tmp_path / "target")
    target.processor.save_pretrained(tmp_path / "target")
    common = ["train", "--target", str(tmp_path / "target"), "--text-data", str(text.folder), "--epochs", "1",
              "--micro-batch-size", "2", "--mixed-precision", "no", "--eval-samples", "0", "--warmup-steps", "1"]
    assert main(common + ["--output", str(tmp_path / "two"), "--draft-layers", "2"]) == 0
    draft = DraftModel.from_pretrained(tmp_path / "two" / "draft")
    assert draft.config.num_layers == 2
    assert_decodes_like_plain(target, draft, TreeParams(depth=3, top_k=2, total_tokens=6))

    with pytest.raises(MSDError, match="draft_layers 3 does not match"):
        DraftTrainer(config(draft_layers=3), target, text, vision, tmp_path / "three", draft=draft)

    # --resume takes the layer count from the checkpoint, so it need not be repeated
    assert main(common + ["--output", str(tmp_path / "two"), "--resume", "--epochs", "2"]) == 0
    assert DraftModel.from_pretrained(tmp_path / "two" / "draft").config.num_layers == 2


def test_resume_other_layout_raises(tmp_path, setup):
    # A trainer whose fresh draft differs from the checkpoint's draft raises before it loads any state.
    target, text, vision = setup
    DraftTrainer(config(epochs=1, draft_layers=2), target, text, vision, tmp_path).train()
    with pytest.raises(MSDError, match="its draft has num_layers 2, the draft of this run 1"):
        DraftTrainer(config(epochs=2), target, text, vision, tmp_path).train(resume=True)


def test_metrics_include_heldout_agreement(tmp_path, setup, caplog):
    target, text, vision = setup
    trainer = DraftTrainer(config(eval_samples=1, epochs=1), target, text, vision, tmp_path)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval/text_top1"] <= 1.0
    assert 0.0 <= metrics["eval/multimodal_top1"] <= 1.0
    with caplog.at_level("INFO"):
        trainer.train()
    assert "train/samples_per_second" in caplog.text
    assert "multimodal share" in caplog.text


def test_kind_and_target_mismatch_raise(tmp_path, setup):
    target, text, vision = setup
    with pytest.raises(MSDError, match="expected 'text'"):
        DraftTrainer(config(), target, vision, None, tmp_path)
    other = tiny_target(seed=1)
    other.text_config.hidden_size = 32  # stands for a target of another size
    with pytest.raises(MSDError, match="hidden_size"):
        DraftTrainer(config(), other, text, None, tmp_path)
    # Features stored with another image token are another target's too.
    copied = FeatureDataset(text.folder)
    copied.card = json.loads(json.dumps(copied.card))
    copied.card["settings"]["image_token_id"] += 1
    with pytest.raises(MSDError, match="image_token_id"):
        DraftTrainer(config(), target, copied, None, tmp_path)
    copied.card["settings"]["image_token_id"] -= 1
    copied.card["settings"]["position_rows"] = 3  # Qwen2-VL's 3-D positions
    with pytest.raises(MSDError, match="position_rows 3"):
        DraftTrainer(config(), target, copied, None, tmp_path)


def test_empty_or_missing_folder_raises(tmp_path):
    from msd.train.data import open_feature_folder

    with pytest.raises(MSDError, match="not found"):
        open_feature_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MSDError):
        open_feature_folder(tmp_path / "empty")
    # LLaVA-format rows passed straight to training: the message names the step that turns them into features.
    (tmp_path / "mix.json").write_text("[]")
    with pytest.raises(MSDError, match="is a file.*prepare-data --data"):
        open_feature_folder(tmp_path / "mix.json")


def test_several_folders_train_as_one_source(tmp_path, setup):
    # two text folders read as one dataset in order; a vision folder cannot join them
    from msd.train.data import open_feature_folders

    target, text, vision = setup
    extra = prepare_folder(target, tmp_path / "extra", 3, "text", answer_tokens=6)
    combined = open_feature_folders([text.folder, extra.folder])
    assert len(combined) == len(text) + len(extra)
    assert torch.equal(combined[len(text)]["input_ids"], extra[0]["input_ids"])
    assert len(open_feature_folders([text.folder])) == len(text)

    final = DraftTrainer(config(epochs=1), target, combined, vision, tmp_path / "run").train()
    assert (final / "model.safetensors").is_file()

    with pytest.raises(MSDError, match="kind"):
        open_feature_folders([text.folder, vision.folder])


def test_nan_loss_names_step_and_samples(tmp_path, setup):
    target, text, vision = setup

    class Poisoned(torch.utils.data.Dataset):
        card = text.card

        def __len__(self):
            return len(text)

        def __getitem__(self, index):
            sample = dict(text[index])
            sample["hidden_states"] = torch.full_like(sample["hidden_states"], math.nan)
            return sample

    trainer = DraftTrainer(config(), target, Poisoned(), None, tmp_path)
    with pytest.raises(MSDError, match=r"step 1 on samples text\[\d+\]"):
        trainer.train()


def test_invalid_config_raises():
    with pytest.raises(MSDError, match="micro_batch_size"):
        TrainConfig(micro_batch_size=0)
    with pytest.raises(MSDError, match="unknown training options"):
        TrainConfig.from_dict({"learning_rat": 1.0})
    with pytest.raises(MSDError, match=r"unknown loss options \['unroll_step'\]"):
        TrainConfig.from_dict({"loss": {"unroll_step": 2}})
    with pytest.raises(MSDError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    for layers in (0, True):
        with pytest.raises(MSDError, match="draft_layers"):
            TrainConfig(draft_layers=layers)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epochs": "1"}, "training option epochs must be a whole number, got '1'"),
        ({"draft_layers": 2.5}, "training option draft_layers must be a whole number or null, got 2.5"),
        ({"draft_layers": True}, "training option draft_layers must be a whole number or null, got True"),
        ({"learning_rate": "1e-4"}, "training option learning_rate must be a number, got '1e-4'"),
        ({"save_each_epoch": "yes"}, "training option save_each_epoch must be true or false, got 'yes'"),
        ({"loss": {"token_weight": "0.1"}}, "loss option token_weight must be a number, got '0.1'"),
        ({"curriculum": {"text_only": True}}, "curriculum option text_only must be a whole number or null, got True"),
    ],
)
def test_config_wrong_types_raise(options, message):
    # YAML and JSON can carry "1", 2.5 or true where a count belongs. The message names the option and the value.
    with pytest.raises(MSDError, match=re.escape(message)):
        TrainConfig.from_dict(options)


def test_save_dtype_writes_half_precision(tmp_path, setup):
    # save_dtype casts the final draft's floating-point weights; the vocabulary map keeps its integer dtype and
    # the draft loads and decodes losslessly
    target, text, vision = setup
    options = config(epochs=1, save_dtype="float16", draft_vocab_size=40)
    final = DraftTrainer(options, target, text, vision, tmp_path).train()
    saved = weights(final)
    floating = [name for name, tensor in saved.items() if tensor.is_floating_point()]
    assert floating
    assert all(saved[name].dtype == torch.float16 for name in floating)
    assert saved["draft_to_target"].dtype in (torch.int32, torch.int64)

    draft = DraftModel.from_pretrained(final, dtype=torch.float64)
    assert_decodes_like_plain(target, draft, TreeParams(depth=2, top_k=2, total_tokens=4))


def test_model_config_as_training_config_raises(tmp_path):
    # The research pipeline's --config is the draft layer's config.json. Passed to msd train --config, it is named as
    # a model config instead of being listed option by option.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 1}))
    with pytest.raises(MSDError, match="is a model config .* start from configs/train_research.yaml"):
        load_train_config(path)


def test_invalid_save_dtype_raises():
    with pytest.raises(MSDError, match="save_dtype must be one of float32, float16, bfloat16, got 'int8'"):
        TrainConfig(save_dtype="int8")
