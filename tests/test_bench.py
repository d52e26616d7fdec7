"""`msd bench`: the measurement loop, the report's arithmetic, the identity check and the files it writes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from msd.cli import main
from msd.decoding import Drafter, SpeculativeGenerator, TreeParams
from msd.decoding.tree import DraftTree
from msd.draft import DraftConfig, DraftModel
from msd.errors import MSDError
from msd.evaluate.bench import (
    UNTIMED_TOKENS,
    BenchSettings,
    SampleRecord,
    median_run,
    processor_inputs,
    run_bench,
)
from msd.evaluate.method_setup import build_methods, check_draft_kind
from msd.evaluate.methods import METHOD_NAMES, EngineMethod, GenerationLimits, Method, MethodRun
from msd.evaluate.report import all_identical, summarize, write_report
from msd.evaluate.samples import EvalSample, load_samples
from msd.targets import adapter_for
from tiny_models import build_llava, random_image

MAX_NEW_TOKENS = 12
DEPTH = 3


class OracleDrafter(Drafter):
    """Proposes the target's own greedy continuation, looked up by prompt, as a chain of DEPTH tokens."""

    def __init__(self, continuations: dict[tuple, list[int]]):
        self.continuations = continuations
        self.tokens: list[int] = []
        self.position = 0

    def start(self, prefill, state, first_token):
        self.tokens = self.continuations[tuple(prefill.input_ids.tolist())]
        self.position = 1

    def propose(self, root_token, params, max_depth):
        depth = min(params.depth, max_depth)
        return DraftTree.chain([root_token, *self.tokens[self.position : self.position + depth]])

    def update(self, new_tokens, accepted_hidden):
        self.position += new_tokens.shape[0]


class RandomDrafter(Drafter):
    """Proposes random chains: almost never accepted, so tau stays near 1."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(0)

    def propose(self, root_token, params, max_depth):
        tokens = torch.randint(self.vocab_size, (min(params.depth, max_depth),), generator=self.generator)
        return DraftTree.chain([root_token, *tokens.tolist()])


class BrokenMethod(Method):
    """Plain decoding with its last token changed: a lossy method the identity check must catch."""

    def __init__(self, plain: Method, vocab_size: int):
        self.name = "broken"
        self.plain = plain
        self.vocab_size = vocab_size

    def run(self, inputs, limits):
        run = self.plain.run(inputs, limits)
        run.token_ids[-1] = (run.token_ids[-1] + 1) % self.vocab_size
        return run


@pytest.fixture(scope="module")
def llava():
    model, processor = build_llava(seed=0)
    return adapter_for(model, processor)


@pytest.fixture(scope="module")
def samples():
    return [
        EvalSample("a", "vqa", "<image>\nWhat is in this image?", [random_image(40, 30, seed=1)], stop_strings=[]),
        EvalSample("b", "vqa", "Describe the picture.", [random_image(30, 50, seed=2)]),
        EvalSample("c", "caption", "<image>\nA cat sits on a mat", [random_image(50, 50, seed=3)]),
    ]


def greedy_continuations(target, samples, length):
    build = processor_inputs(target.processor)
    continuations = {}
    for sample in samples:
        inputs = build(sample)
        output = SpeculativeGenerator(target, None).generate(inputs, max_new_tokens=length, eos_token_ids=[])
        continuations[tuple(inputs["input_ids"][0].tolist())] = output.token_ids
    return continuations


def engine(name, target, drafter=None):
    return EngineMethod(name, SpeculativeGenerator(target, drafter, TreeParams(depth=DEPTH, top_k=2, total_tokens=8)))


def test_oracle_draft_reaches_full_tau(llava, samples):
    continuations = greedy_continuations(llava, samples, MAX_NEW_TOKENS + DEPTH + 1)
    methods = [engine("plain", llava), engine("msd", llava, OracleDrafter(continuations))]
    settings = BenchSettings(max_new_tokens=MAX_NEW_TOKENS, research_convention=True, warmup=1)
    records = run_bench(methods, samples, settings, processor_inputs(llava.processor), progress=False)
    summary = summarize(records)

    oracle = [record for record in records if record.method == "msd"]
    assert all(record.new_tokens == MAX_NEW_TOKENS for record in oracle)
    assert all(set(record.accepted_lengths) == {DEPTH} for record in oracle)
    assert summary["msd"]["overall"]["tau"] == DEPTH + 1
    # The prefill emits the first token; each forward then emits DEPTH + 1.
    assert all(record.target_forwards == math.ceil((MAX_NEW_TOKENS - 1) / (DEPTH + 1)) for record in oracle)
    assert summary["plain"]["overall"]["tau"] == 1
    assert summary["msd"]["overall"]["identical_share"] == 1.0
    assert summary["msd"]["overall"]["accepted_length_histogram"] == {DEPTH: sum(r.target_forwards for r in oracle)}


def test_random_draft_stays_identical(llava, samples):
    methods = [engine("plain", llava), engine("msd", llava, RandomDrafter(llava.vocab_size))]
    settings = BenchSettings(max_new_tokens=MAX_NEW_TOKENS, warmup=0)
    records = run_bench(methods, samples, settings, processor_inputs(llava.processor), progress=False)
    summary = summarize(records)
    assert summary["msd"]["overall"]["identical_share"] == 1.0
    assert summary["msd"]["overall"]["tau"] >= 1.0
    assert set(summary["msd"]) == {"vqa", "caption", "overall"}
    assert summary["msd"]["vqa"]["samples"] == 2


def test_broken_method_fails_identity(llava, samples):
    plain = engine("plain", llava)
    methods = [plain, BrokenMethod(plain, llava.vocab_size)]
    records = run_bench(methods, samples, BenchSettings(max_new_tokens=4, warmup=0), processor_inputs(llava.processor),
                        progress=False)
    summary = summarize(records)
    assert summary["broken"]["overall"]["identical_share"] == 0.0
    assert summary["broken"]["overall"]["different"] == ["a", "b", "c"]
    assert not all_identical(summary)


class RecordingMethod(Method):
    """Plain decoding that records the limit of every run it is given."""

    def __init__(self, plain: Method, name: str, log: list):
        self.name = name
        self.plain = plain
        self.log = log

    def run(self, inputs, limits):
        self.log.append((self.name, limits.max_new_tokens))
        return self.plain.run(inputs, limits)


def test_prompt_runs_untimed_before_methods(llava, samples):
    # Before each sample every method decodes two tokens of it untimed, so no timed run pays for building the kernels
    # of a new prompt length (the second token makes a drafter read the prompt).
    log = []
    plain = engine("plain", llava)
    methods = [RecordingMethod(plain, "plain", log), RecordingMethod(plain, "other", log)]
    records = run_bench(methods, samples, BenchSettings(max_new_tokens=4, warmup=0), processor_inputs(llava.processor),
                        progress=False)
    assert len(records) == 6
    untimed = [entry for sample in range(3) for entry in log[4 * sample : 4 * sample + 2]]
    assert untimed == [("plain", UNTIMED_TOKENS), ("other", UNTIMED_TOKENS)] * 3
    # The timed order rotates from one sample to the next, so no method always runs first.
    timed = [log[4 * sample + 2 : 4 * sample + 4] for sample in range(3)]
    assert timed == [[("plain", 4), ("other", 4)], [("other", 4), ("plain", 4)], [("plain", 4), ("other", 4)]]


class CountingDrafter(RandomDrafter):
    """A RandomDrafter that counts the sequences it starts, each of which reads a prompt."""

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size)
        self.starts = 0

    def start(self, prefill, state, first_token):
        self.starts += 1


def test_untimed_run_starts_drafter(llava, samples):
    # The untimed run reaches the drafter, so the draft's kernels for the prompt length are built before timing.
    drafter = CountingDrafter(llava.model.config.text_config.vocab_size)
    methods = [engine("plain", llava), engine("msd", llava, drafter)]
    run_bench(methods, samples, BenchSettings(max_new_tokens=4, warmup=0), processor_inputs(llava.processor),
              progress=False)
    assert drafter.starts == 2 * len(samples)


class TimedMethod(Method):
    """Returns preset runs in turn, each with its own total time, and counts its timed runs."""

    def __init__(self, name: str, times: list[float], tokens: list[list[int]] | None = None):
        self.name = name
        self.times = times
        self.tokens = tokens or [[1, 2]] * len(times)
        self.timed = 0

    def run(self, inputs, limits):
        if limits.max_new_tokens == UNTIMED_TOKENS:
            return MethodRun([1, 2], 0.0, 1, 0.0, [])
        run = MethodRun(self.tokens[self.timed], self.times[self.timed], 1, 0.0, [])
        self.timed += 1
        return run


def test_repeats_keep_median_run(llava, samples):
    # With three repeats, every method is timed three times per sample and reports its median run, so one slow
    # spell during a run does not move the result.
    methods = [TimedMethod("plain", [3.0, 1.0, 2.0]), TimedMethod("other", [0.5, 9.0, 1.0])]
    records = run_bench(methods, samples[:1], BenchSettings(max_new_tokens=4, warmup=0, repeats=3),
                        processor_inputs(llava.processor), progress=False)
    assert [method.timed for method in methods] == [3, 3]
    assert {record.method: record.total_time for record in records} == {"plain": 2.0, "other": 1.0}


def test_median_run_cases():
    # The lower middle run for an even count, and the first run when the runs decoded different tokens.
    runs = [MethodRun([1], total, 1, 0.0, []) for total in (4.0, 1.0, 3.0, 2.0)]
    assert median_run(runs).total_time == 2.0
    differing = [MethodRun([1], 5.0, 1, 0.0, []), MethodRun([2], 1.0, 1, 0.0, []), MethodRun([1], 3.0, 1, 0.0, [])]
    assert median_run(differing).total_time == 5.0
    with pytest.raises(MSDError, match="--repeats must be at least 1, got 0"):
        BenchSettings(repeats=0)


def record(sample_id, task, method, tokens, prefill, total, forwards, accepted):
    return SampleRecord(sample_id, task, method, tokens, None, len(tokens), prefill,
                        None if prefill is None else total - prefill, total, forwards, accepted)


def test_report_arithmetic():
    records = [
        record("s1", "t", "plain", [1, 2, 3, 4, 5], 1.0, 5.0, 4, [0, 0, 0, 0]),
        record("s2", "t", "plain", [1, 2, 3], 1.0, 3.0, 2, [0, 0]),
        record("s1", "t", "msd", [1, 2, 3, 4, 5], 1.0, 2.0, 2, [1, 1]),
        record("s2", "t", "msd", [1, 2, 3], 1.0, 1.5, 1, [1]),
        record("s1", "t", "prompt-lookup", [1, 2, 3, 4, 5], None, 4.0, 2, None),
        record("s2", "t", "prompt-lookup", [1, 2, 9], None, 2.0, 2, None),
    ]
    summary = summarize(records)
    msd = summary["msd"]["overall"]
    assert msd["tau"] == 2.0
    assert msd["tokens_per_second"] == pytest.approx(8 / 3.5)
    assert msd["speedup_end_to_end"]["mean"] == pytest.approx((5 / 2 + 3 / 1.5) / 2)
    assert msd["speedup_end_to_end"]["of_totals"] == pytest.approx(8 / 3.5)
    assert msd["speedup_end_to_end"]["min"] == pytest.approx(2.0)
    assert msd["speedup_end_to_end"]["max"] == pytest.approx(2.5)
    assert msd["speedup_end_to_end"]["std"] == pytest.approx(0.5**0.5 * 0.5)
    assert msd["speedup_decode"]["mean"] == pytest.approx((4 / 1 + 2 / 0.5) / 2)
    assert msd["speedup_decode"]["of_totals"] == pytest.approx(6 / 1.5)
    assert msd["mean_new_tokens"] == 4.0
    assert msd["accepted_length_histogram"] == {1: 3}

    lookup = summary["prompt-lookup"]["overall"]
    assert lookup["tau"] == pytest.approx((4 + 2) / 4)  # (new tokens - 1) / forwards, pooled
    assert lookup["speedup_decode"] is None
    assert lookup["accepted_length_histogram"] is None
    assert lookup["identical_share"] == 0.5
    assert lookup["different"] == ["s2"]


def test_report_files_written(tmp_path, llava, samples):
    methods = [engine("plain", llava), engine("msd", llava, RandomDrafter(llava.vocab_size))]
    tokenizer = llava.processor.tokenizer
    records = run_bench(methods, samples[:1], BenchSettings(max_new_tokens=3, warmup=0),
                        processor_inputs(llava.processor), tokenizer, progress=False)
    written = write_report(tmp_path / "out", records, summarize(records), {"target": "tiny"})
    names = {path.name for path in written}
    assert {"report.json", "report.md"} <= names
    try:
        import matplotlib  # noqa: F401

        assert {"speedup_by_task.png", "accepted_lengths.png"} <= names
    except ImportError:
        assert len(names) == 2
    assert all(path.is_file() and path.stat().st_size > 0 for path in written)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["records"][0]["text"] == tokenizer.decode(report["records"][0]["token_ids"], skip_special_tokens=True)
    assert "| msd | vqa | 1 |" in (tmp_path / "out" / "report.md").read_text()


def test_settings_limits_and_guards():
    sample = EvalSample("x", "t", "p", [], stop_strings=["\n"])
    assert BenchSettings(max_new_tokens=5).limits_for(sample) == GenerationLimits(5, ("\n",))
    assert BenchSettings(max_new_tokens=5, stop_strings=("END",)).limits_for(sample).stop_strings == ("END",)
    research = BenchSettings(max_new_tokens=512, research_convention=True).limits_for(sample)
    assert research == GenerationLimits(512, (), ignore_eos=True)
    with pytest.raises(MSDError, match="max-new-tokens"):
        BenchSettings(max_new_tokens=0)
    with pytest.raises(MSDError, match="empty"):
        run_bench([], [], BenchSettings(), lambda sample: {})


def test_transformers_method_ignores_eos(llava, samples):
    # Under the research convention every method generates max_new_tokens, even where the target chooses its
    # end-of-sequence token. The first greedy token is made the EOS token here, so `generate` would stop at once.
    inputs = processor_inputs(llava.processor)(samples[0])
    first = SpeculativeGenerator(llava, None).generate(inputs, max_new_tokens=1, eos_token_ids=[]).token_ids[0]
    saved = (llava.model.generation_config.eos_token_id, llava.model.generation_config.pad_token_id)
    llava.model.generation_config.eos_token_id, llava.model.generation_config.pad_token_id = first, None
    try:
        method = build_methods(llava, ["generate"], TreeParams(), drafts={})[-1]
        stopped = method.run(inputs, GenerationLimits(MAX_NEW_TOKENS, ()))
        forced = method.run(inputs, GenerationLimits(MAX_NEW_TOKENS, (), ignore_eos=True))
    finally:
        llava.model.generation_config.eos_token_id, llava.model.generation_config.pad_token_id = saved
    assert stopped.token_ids == [first]
    assert len(forced.token_ids) == MAX_NEW_TOKENS
    assert forced.token_ids[0] == first
    # The prefill emits the first token and is not a decoding forward, so plain `generate` makes one per later token.
    assert stopped.target_forwards == 0
    assert forced.target_forwards == MAX_NEW_TOKENS - 1


def test_engine_method_ignores_eos(llava, samples):
    # msd's own loop follows the research convention too: with the first greedy token as the EOS token, plain and
    # speculative decoding stop at once, unless the limits ignore EOS.
    inputs = processor_inputs(llava.processor)(samples[0])
    first = SpeculativeGenerator(llava, None).generate(inputs, max_new_tokens=1, eos_token_ids=[]).token_ids[0]
    saved = llava.model.generation_config.eos_token_id
    llava.model.generation_config.eos_token_id = first
    try:
        method = engine("plain", llava)
        stopped = method.run(inputs, GenerationLimits(MAX_NEW_TOKENS, ()))
        forced = method.run(inputs, GenerationLimits(MAX_NEW_TOKENS, (), ignore_eos=True))
    finally:
        llava.model.generation_config.eos_token_id = saved
    assert stopped.token_ids == [first]
    assert len(forced.token_ids) == MAX_NEW_TOKENS
    assert forced.token_ids[0] == first


def test_draft_kind_checked(llava):
    eagle = DraftModel(DraftConfig.for_target(llava, decouple_visual=False))
    with pytest.raises(MSDError, match="--eagle-draft"):
        check_draft_kind("msd", eagle)
    # An MSD draft passed as the ablation points to the conversion option that gives the ablation its layout.
    with pytest.raises(MSDError, match="--draft instead, or convert .* --no-decouple-visual"):
        check_draft_kind("eagle", DraftModel(DraftConfig.for_target(llava)))
    with pytest.raises(MSDError, match="unknown bench method"):
        build_methods(llava, ["plain", "medusa"], TreeParams(), {})
    with pytest.raises(MSDError, match="--assistant"):
        build_methods(llava, ["plain", "assisted"], TreeParams(), {})


def test_load_samples_errors(tmp_path):
    with pytest.raises(MSDError, match="unknown evaluation set"):
        load_samples(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "image": "x.png"}\n')
    with pytest.raises(MSDError, match="conversations"):
        load_samples(str(bad))
    # A malformed row is reported by its line in the file, counting blank lines.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1}\n\n{bad json\n')
    with pytest.raises(MSDError, match=r"invalid JSON on line 3 of .*broken\.jsonl"):
        load_samples(str(broken))
    # An image missing from the image folder names the option that sets the folder.
    missing = tmp_path / "missing-image.jsonl"
    missing.write_text(json.dumps({"id": 1, "image": "photo.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}]}) + "\n")
    with pytest.raises(MSDError, match="image 'photo.jpg' of .* not found .* --image-folder"):
        load_samples(str(missing))
    local = load_samples("local")
    assert {sample.task for sample in local} == {"vqa", "caption"}
    assert all(sample.images and sample.reference for sample in local)


def write_eval_file(folder):
    rows = []
    for index in range(2):
        random_image(48, 36, seed=index).save(folder / f"image{index}.png")
        rows.append({
            "id": f"q{index}",
            "task": "vqa" if index else "caption",
            "image": f"image{index}.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "x"}],
            "stop": ["."],
        })
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_bench_end_to_end(tmp_path, llava):
    model, processor = build_llava(seed=0)
    model.save_pretrained(tmp_path / "target")
    processor.save_pretrained(tmp_path / "target")
    torch.manual_seed(0)
    DraftModel(DraftConfig.for_target(llava)).save_pretrained(tmp_path / "draft")
    DraftModel(DraftConfig.for_target(llava, decouple_visual=False)).save_pretrained(tmp_path / "eagle")
    assistant, assistant_processor = build_llava(seed=1, layers=1)
    assistant.save_pretrained(tmp_path / "assistant")
    assistant_processor.save_pretrained(tmp_path / "assistant")
    data = write_eval_file(tmp_path)

    code = main([
        "bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
        "--eagle-draft", str(tmp_path / "eagle"), "--assistant", str(tmp_path / "assistant"),
        "--data", str(data), "--max-new-tokens", "6", "--total-tokens", "6", "--depth", "2",
        "--tune-tree", "--tune-sizes", "4,8", "--tune-depths", "1,2", "--tune-pilot-tokens", "4",
        "--methods", "generate,msd,eagle,prompt-lookup,assisted", "--output", str(tmp_path / "out"), "--no-progress",
        "--repeats", "2",
    ])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["context"]["repeats"] == 2
    ran = set(report["summary"])
    assert {"plain", "generate", "msd", "eagle", "assisted"} <= ran
    assert ran | set(report["context"]["skipped_methods"]) == set(METHOD_NAMES)
    chosen = report["context"]["tree_tuning"]["chosen"]
    assert chosen["total_tokens"] in (4, 8)
    assert chosen["depth"] in (1, 2)
    assert set(report["summary"]["msd"]) == {"vqa", "caption", "overall"}
    assert all(groups["overall"]["identical_share"] == 1.0 for groups in report["summary"].values())


def test_cli_bench_rejects_bad_options(tmp_path, capsys):
    code = main(["bench", "--target", str(tmp_path), "--tune-tree", "--output", str(tmp_path / "o")])
    assert code == 2
    assert "--tune-tree" in capsys.readouterr().err
    code = main(["bench", "--target", str(tmp_path), "--prompt-lookup-tokens", "0", "--output", str(tmp_path / "o")])
    assert code == 2
    assert "--prompt-lookup-tokens must be at least 1, got 0" in capsys.readouterr().err
    # An output path that is a file fails before any model loads, not when the report is written.
    existing = tmp_path / "report.txt"
    existing.write_text("")
    code = main(["bench", "--target", str(tmp_path), "--output", str(existing)])
    assert code == 2
    assert f"--output {existing} is a file" in capsys.readouterr().err
    code = main(["bench", "--target", str(tmp_path), "--max-new-tokens", "0", "--output", str(tmp_path / "o")])
    assert code == 2
