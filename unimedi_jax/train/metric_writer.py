"""Metric sinks of a run: ``metrics.jsonl`` (one object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


def format_duration(seconds: float) -> str:
    """Human ETA: 45s, 12m03s, 3h07m."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def tensorboard_name(name: str) -> str:
    """A metric name as TensorBoard accepts it ('retrieval_image/image_to_text/R@1' ->
    '.../R_1'): tensorboardX makes the same change but logs a line per name and write."""
    return re.sub(r"[^-/\w.]", "_", name)


def _logged_step(line: str) -> int | None:
    """The step of one metrics line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def rewind_jsonl(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (and any cut-short line) from a metrics file: a
    resumed run logs those steps again, so each step keeps exactly one line."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)  # atomic: a kill now leaves the old or the new file


class MetricWriter:
    """Appends to ``workdir/metrics.jsonl`` and writes TensorBoard scalars (process 0 only).

    ``resume_step``: the step the run continues from; later lines of ``metrics.jsonl`` are
    dropped first (TensorBoard shows both, as it does for any rerun).
    """

    def __init__(self, workdir: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if enabled:
            rewind_jsonl(workdir / "metrics.jsonl", resume_step)
            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (lives with the run)
            # Imported here: tensorboardX imports torch where it is installed (~1.5 s), which
            # every command importing this module (evaluate, export, --help) would pay.
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(tensorboard_name(name), value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
