"""Running training metrics: sums over a logging window, written to the console and to accelerate's trackers."""

from __future__ import annotations

import importlib.util
import logging
import time

import torch

logger = logging.getLogger(__name__)


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class MetricWindow:
    """Loss parts and top-1 agreement summed over the optimizer steps since the last report.

    Each micro-batch's mean losses are weighted by its counted slots (of the first draft step), so the reported losses
    are means over slots, as the training objective is.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums = {"loss": 0.0, "feature_loss": 0.0, "token_loss": 0.0}  # slot-weighted
        self.agreements = 0
        self.slots = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, output, samples: int) -> None:
        """Add one micro-batch's LossOutput and its sample count."""
        self.sums["loss"] += float(output.mean_loss) * output.slots
        self.sums["feature_loss"] += float(output.feature_loss) * output.slots
        self.sums["token_loss"] += float(output.token_loss) * output.slots
        self.agreements += output.agreements
        self.slots += output.slots
        self.samples += samples

    def report(self, accelerator) -> dict[str, float]:
        """Means over the window's counted slots on all processes, and samples per second over all processes."""
        totals = torch.tensor(
            [*self.sums.values(), self.agreements, self.slots, self.samples],
            dtype=torch.float64,
            device=accelerator.device,
        )
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        loss, feature_loss, token_loss, agreements, slots, samples = totals
        elapsed = time.perf_counter() - self.started
        nan = float("nan")
        metrics = {
            "train/loss": loss / slots if slots else nan,
            "train/feature_loss": feature_loss / slots if slots else nan,
            "train/token_loss": token_loss / slots if slots else nan,
            "train/top1": agreements / slots if slots else nan,
            "train/samples_per_second": samples / elapsed if elapsed > 0 else float("nan"),
        }
        self.reset()
        return metrics


def write_metrics(accelerator, metrics: dict[str, float], step: int) -> None:
    """Log `metrics` on the main process's console and to the configured trackers (TensorBoard when installed)."""
    if accelerator.is_main_process:
        text = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
        logger.info("step %d: %s", step, text)
    accelerator.log(metrics, step=step)
