"""The bench report: per task and overall, for each method, the numbers below, written as JSON and Markdown.

- tau: tokens emitted per target forward during decoding, the bonus token included: 1 + mean accepted length over
  all cycles of all samples. transformers' methods do not expose accepted lengths, so for them tau is
  (new tokens - 1) / target forwards, the first token coming from the prefill. Plain decoding has tau = 1.
- tokens_per_second: new tokens of all samples / their end-to-end time.
- speedup (decode-only and end to end): plain decoding's time over the method's time, on the same samples. `mean` and
  `std` are over per-sample ratios, `min` and `max` bound them, `of_totals` is total plain time over total method
  time (weights long samples more). Decode-only time excludes the prefill (prompt and image encoding plus the first
  token), and is null for methods timed end to end only.
- mean_new_tokens: mean output length in tokens.
- identical_share: share of samples whose output ids equal plain decoding's; greedy decoding must give 1.0.
  `different` lists the sample ids that differ.
- accepted_length_histogram: how many cycles accepted 0, 1, 2, ... draft tokens.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from msd.evaluate.bench import SampleRecord

OVERALL = "overall"


def summarize(records: Sequence[SampleRecord]) -> dict:
    """Report numbers per method, per task and overall: {method: {task or "overall": {...}}}."""
    plain = {record.sample_id: record for record in records if record.method == "plain"}
    methods = list(dict.fromkeys(record.method for record in records))
    tasks = list(dict.fromkeys(record.task for record in records))
    summary = {}
    for method in methods:
        own = [record for record in records if record.method == method]
        summary[method] = {task: summarize_group([r for r in own if r.task == task], plain) for task in tasks}
        summary[method][OVERALL] = summarize_group(own, plain)
    return summary


def summarize_group(records: Sequence[SampleRecord], plain: dict[str, SampleRecord]) -> dict:
    baselines = [plain[record.sample_id] for record in records]
    different = [r.sample_id for r, base in zip(records, baselines) if r.token_ids != base.token_ids]
    return {
        "samples": len(records),
        "tau": tau(records),
        "tokens_per_second": ratio(sum(r.new_tokens for r in records), sum(r.total_time for r in records)),
        "mean_new_tokens": statistics.fmean(r.new_tokens for r in records) if records else math.nan,
        "target_forwards": sum(r.target_forwards for r in records),
        "speedup_end_to_end": speedup([b.total_time for b in baselines], [r.total_time for r in records]),
        "speedup_decode": speedup([b.decode_time for b in baselines], [r.decode_time for r in records]),
        "identical_share": 1 - len(different) / len(records) if records else math.nan,
        "different": different,
        "accepted_length_histogram": accepted_histogram(records),
    }


def tau(records: Sequence[SampleRecord]) -> float:
    if records and all(r.accepted_lengths is not None for r in records):
        lengths = [length for r in records for length in r.accepted_lengths]
        return 1 + sum(lengths) / len(lengths) if lengths else math.nan
    decoded = sum(max(r.new_tokens - 1, 0) for r in records)
    return ratio(decoded, sum(r.target_forwards for r in records))


def speedup(baseline_times: Sequence[float | None], method_times: Sequence[float | None]) -> dict | None:
    """Speedup statistics of the method over the baseline (see the module docstring); None when a time is missing."""
    if not method_times or any(t is None for t in (*baseline_times, *method_times)):
        return None
    ratios = [ratio(base, own) for base, own in zip(baseline_times, method_times)]
    return {
        "mean": statistics.fmean(ratios),
        "std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
        "min": min(ratios),
        "max": max(ratios),
        "of_totals": ratio(sum(baseline_times), sum(method_times)),
    }


def accepted_histogram(records: Sequence[SampleRecord]) -> dict[int, int] | None:
    if not records or any(r.accepted_lengths is None for r in records):
        return None
    counts = Counter(length for r in records for length in r.accepted_lengths)
    return {length: counts[length] for length in sorted(counts)}


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def all_identical(summary: dict) -> bool:
    return all(groups[OVERALL]["identical_share"] == 1.0 for groups in summary.values())


def markdown_table(summary: dict) -> str:
    """One row per method and task: tau, tokens/s, speedups (mean ± std over samples, and ratio of totals)."""
    header = (
        "| method | task | samples | tau | tokens/s | speedup e2e (mean ± std) | e2e of totals "
        "| speedup decode (mean ± std) | decode of totals | mean tokens | identical |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    for method, groups in summary.items():
        for task, numbers in groups.items():
            end_to_end = numbers["speedup_end_to_end"]
            decode = numbers["speedup_decode"]
            rows.append(
                f"| {method} | {task} | {numbers['samples']} | {numbers['tau']:.2f} "
                f"| {numbers['tokens_per_second']:.1f} | {format_spread(end_to_end)} | {format_total(end_to_end)} "
                f"| {format_spread(decode)} | {format_total(decode)} | {numbers['mean_new_tokens']:.1f} "
                f"| {numbers['identical_share']:.0%} |"
            )
    return header + "\n".join(rows) + "\n"


def format_spread(stats: dict | None) -> str:
    return "n/a" if stats is None else f"{stats['mean']:.2f}x ± {stats['std']:.2f}"


def format_total(stats: dict | None) -> str:
    return "n/a" if stats is None else f"{stats['of_totals']:.2f}x"


def write_report(folder: Path, records: Sequence[SampleRecord], summary: dict, context: dict) -> list[Path]:
    """Write report.json (context, summary, every record), report.md and, with matplotlib, the plots."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    report = {"context": context, "summary": summary, "records": [record.as_dict() for record in records]}
    path = folder / "report.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    written.append(path)

    path = folder / "report.md"
    path.write_text(markdown_report(summary, context))
    written.append(path)

    from msd.evaluate.plots import write_plots

    written += write_plots(folder, summary)
    return written


def markdown_report(summary: dict, context: dict) -> str:
    lines = ["# msd bench", ""]
    lines += [f"- {key}: {value}" for key, value in context.items() if value is not None and not isinstance(value, dict)]
    for method, reason in (context.get("skipped_methods") or {}).items():
        lines.append(f"- skipped {method}: {reason}")
    tuning = context.get("tree_tuning")
    if tuning:
        chosen = tuning["chosen"]
        lines.append(f"- tree chosen by --tune-tree: total_tokens={chosen['total_tokens']} depth={chosen['depth']}")
    lines += ["", markdown_table(summary)]
    for method, groups in summary.items():
        different = groups[OVERALL]["different"]
        if different:
            lines.append(f"**{method} differs from plain decoding on:** {', '.join(different)}")
            lines.append("")
    return "\n".join(lines)
