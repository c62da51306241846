"""Metric sinks of a run: ``metrics.jsonl`` (one object per logged step) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter


def format_duration(seconds: float) -> str:
    """Human ETA: 45s, 12m03s, 3h07m."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class MetricWriter:
    """Appends to ``workdir/metrics.jsonl`` and writes TensorBoard scalars (process 0 only)."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (lives with the run)
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
