"""Bench plots: end-to-end speedup by task, and the histogram of accepted lengths. Needs matplotlib (optional)."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SPEEDUP_PLOT = "speedup_by_task.png"
HISTOGRAM_PLOT = "accepted_lengths.png"


def write_plots(folder: Path, summary: dict) -> list[Path]:
    """Write the plots into `folder`; returns their paths, or nothing when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed, so no plots were written (pip install matplotlib)")
        return []
    return [plot_speedup(plt, folder / SPEEDUP_PLOT, summary), plot_histogram(plt, folder / HISTOGRAM_PLOT, summary)]


def plot_speedup(plt, path: Path, summary: dict) -> Path:
    methods = [method for method in summary if method != "plain"]
    tasks = list(next(iter(summary.values())))
    figure, axes = plt.subplots(figsize=(max(4.0, 1.5 * len(tasks)), 3.5))
    width = 0.8 / max(len(methods), 1)
    for offset, method in enumerate(methods):
        means, errors = [], []
        for task in tasks:
            stats = summary[method][task]["speedup_end_to_end"] or {"mean": 0.0, "std": 0.0}
            means.append(stats["mean"])
            errors.append(stats["std"])
        positions = [index + offset * width for index in range(len(tasks))]
        axes.bar(positions, means, width, yerr=errors, label=method, capsize=3)
    axes.axhline(1.0, color="gray", linewidth=0.8)
    axes.set_xticks([index + width * (len(methods) - 1) / 2 for index in range(len(tasks))], tasks)
    axes.set_ylabel("end-to-end speedup over plain")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_histogram(plt, path: Path, summary: dict) -> Path:
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for method, groups in summary.items():
        histogram = groups["overall"]["accepted_length_histogram"]
        if method == "plain" or not histogram:
            continue
        total = sum(histogram.values())
        lengths = sorted(histogram)
        axes.plot(lengths, [histogram[length] / total for length in lengths], marker="o", label=method)
    axes.set_xlabel("accepted draft tokens per target forward")
    axes.set_ylabel("share of cycles")
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
