"""Where a run reports: a JSONL file and TensorBoard (every metric the objective returns), and a
progress bar with loss, tokens/s and ETA. Only the main process writes; the others get no-ops."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends one JSON object per logged step to ``OUTPUT/metrics.jsonl`` and mirrors it to TensorBoard.

    Args:
        output: the run folder.
        enabled: False on every process but the main one.
        resume_step: when resuming, the global step of the checkpoint; records after it (written by
            the interrupted run past its last checkpoint) are dropped so the log reads as one run.
        tensorboard: also write TensorBoard events under ``OUTPUT/tensorboard``.
    """

    def __init__(
        self, output: str | Path, *, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True
    ):
        self.enabled = enabled
        self.path = Path(output) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            _truncate_after(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(Path(output) / TENSORBOARD_DIR), purge_step=None if resume_step is None else resume_step + 1
            )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` (numbers; strings are kept in the JSONL only) at global step `step`."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(output: str | Path) -> list[dict[str, Any]]:
    """The records of ``OUTPUT/metrics.jsonl``, in order."""
    path = Path(output) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def stage_label(name: str, index: int, count: int) -> str:
    """The progress bar's label for stage `index` (from 0) of `count`: ``restore``, or ``cpt (2/2)``."""
    return name if count == 1 else f"{name} ({index + 1}/{count})"


class Progress:
    """A token-counting progress bar (rate = tokens/s, ETA from the token budget); silent when disabled.

    Example:
        >>> bar = Progress(total=1000, done=0, enabled=False)
        >>> bar.update(256, loss=0.5)
        >>> bar.close()
    """

    def __init__(self, total: int, done: int = 0, *, enabled: bool = True, description: str = "restore"):
        self._bar = None
        self._description = description
        if enabled:
            self._bar = tqdm(
                total=total,
                initial=done,
                unit="tok",
                unit_scale=True,
                desc=description,
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
            )

    def update(self, tokens: int, **postfix: float) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.update(tokens)

    def set_description(self, text: str) -> None:
        # Only on a change: tqdm redraws on every call, which a log file keeps as one more bar.
        if self._bar is not None and text != self._description:
            self._bar.set_description(text)
        self._description = text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
