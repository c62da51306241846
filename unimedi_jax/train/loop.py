"""The parts every trainer's step loop shares, so pre-training and fine-tuning behave alike.

A trainer (``pretraining.py``, ``finetuning.py``) reads top to bottom: set up, build the state,
run the step loop, evaluate, finish. Inside its loop it uses:

- ``Progress``: throughput and ETA, one console line every ``log_every_steps``;
- ``is_due``: the cadence of logging, checkpointing and evaluation;
- ``NonFiniteWatch``: the 'stop' policy for a NaN/Inf loss or gradient (``check_finite``);
- ``preemption.StopRequest`` / ``preemption.Preempted``: SIGTERM/SIGINT -> finish the step,
  save what the trainer keeps, stop with a message (exit 143 in the commands);
- ``metric_writer.MetricWriter``: ``metrics.jsonl`` and TensorBoard;
- ``checkpoint.Checkpointer``: orbax checkpoints of the state and the data position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from absl import logging

from unimedi_jax.core.errors import UserError
from unimedi_jax.train.checkpoint import Checkpointer
from unimedi_jax.train.metric_writer import format_duration

# metrics.jsonl keys of the schedule's phases (the curves figure marks them) -> their names; the
# first line logged from the step a phase starts holds its key, the start step as its value.
PHASES = {"phase/warmup_over": "warm-up over", "phase/unmasked_tuning": "unmasked tuning"}


def phase_starts(
    masking: Callable[[int], bool], total_steps: int, warmup_steps: int
) -> dict[int, list[tuple[str, str]]]:
    """step -> [(PHASES key, log line)] of each step that starts a phase: the first after the
    learning-rate warm-up, the first the student sees unmasked (``masking(step - 1)`` false:
    a step updates the state of the step before)."""
    starts: dict[int, list[tuple[str, str]]] = {}
    if 0 < warmup_steps < total_steps:
        starts[warmup_steps + 1] = [
            (
                "phase/warmup_over",
                f"step {warmup_steps + 1}: warm-up over, the learning rate decays from its peak",
            )
        ]
    unmasked = next((s + 1 for s in range(total_steps) if not masking(s)), None)
    if unmasked is not None:
        starts.setdefault(unmasked, []).append(
            (
                "phase/unmasked_tuning",
                f"step {unmasked}: unmasked tuning to the end, the student sees every token; "
                "L_pcl (on masked patches) is 0 from here, so the loss drops by its share",
            )
        )
    return starts


class NonFiniteLossError(UserError, RuntimeError):
    """A NaN or Inf loss or gradient: the run stops; what was saved before stays."""


def is_due(step: int, every: int, last_step: int) -> bool:
    """True at every ``every``-th step (never when ``every`` is 0) and at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


class Progress:
    """Throughput and ETA over the steps since the last report; formats the console line
    ``[prefix]step S/T  <describe(metrics)>  R <unit>/s  ETA E``."""

    def __init__(
        self,
        total_steps: int,
        samples_per_step: int,
        describe: Callable[[Mapping[str, float]], str],
        unit: str = "samples",
    ):
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.describe = describe
        self.unit = unit
        self.start = self.window_start = time.perf_counter()
        self.steps = self.window_steps = 0
        self.last: dict[str, float] = {}
        self.skips = (0, 0)  # (non-finite updates, unusable records) at the last warning

    def tick(self) -> None:
        self.steps += 1
        self.window_steps += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, step: int) -> str:
        """Time left at the average pace since the start (all work between steps included)."""
        per_step = self.elapsed() / max(self.steps, 1)
        return format_duration((self.total_steps - step) * per_step)

    def report(self, step: int, metrics: Mapping, prefix: str = "") -> dict[str, float]:
        """Logs one line and returns the metrics to record (with samples_per_sec)."""
        seconds = time.perf_counter() - self.window_start
        per_step = seconds / max(self.window_steps, 1)
        self.last = {k: float(v) for k, v in metrics.items()}
        self.last["samples_per_sec"] = self.samples_per_step / max(per_step, 1e-9)
        logging.info(
            "%sstep %d/%d  %s  %.1f %s/s  ETA %s",
            prefix,
            step,
            self.total_steps,
            self.describe(self.last),
            self.last["samples_per_sec"],
            self.unit,
            format_duration((self.total_steps - step) * per_step),
        )
        skips = (int(self.last.get("nonfinite_skips", 0)), int(self.last.get("data_skipped", 0)))
        if skips != self.skips:
            logging.warning(
                "so far %d updates skipped for a non-finite loss, %d unusable records replaced",
                *skips,
            )
            self.skips = skips
        self.window_start, self.window_steps = time.perf_counter(), 0
        return self.last


def check_finite(
    step: int,
    metrics: Mapping,
    remedy: str,
    checkpointer: Checkpointer | None = None,
    epoch: str | None = None,
) -> None:
    """Raises NonFiniteLossError at a NaN/Inf loss or gradient norm, naming the step (and the
    epoch, ``'2/50'``), the loss terms, the last checkpoint (when the run keeps them) and
    ``remedy``: what the user can change."""
    watched = {k: float(v) for k, v in metrics.items() if k.startswith("loss") or k == "grad_norm"}
    if all(math.isfinite(v) for v in watched.values()):
        return
    terms = ", ".join(f"{k}={v:.4g}" for k, v in watched.items())
    where = f"step {step}" if epoch is None else f"epoch {epoch}, step {step}"
    message = f"non-finite loss or gradients at {where} ({terms})."
    if checkpointer is not None:
        latest = checkpointer.latest_step()
        last_good = (
            f"The last good checkpoint is step {latest} in {checkpointer.directory}"
            if latest is not None
            else f"No checkpoint was written yet in {checkpointer.directory}"
        )
        message += f" {last_good};"
    raise NonFiniteLossError(f"{message} {remedy}")


class NonFiniteWatch:
    """The 'stop' policy: each step's metrics are checked once the next step is dispatched,
    so the host never waits for the step it just started; ``check`` checks at once where the
    loop reads the metrics anyway (log and checkpoint steps, the end of an epoch). Disabled,
    it checks nothing (the 'skip' policy lives in the compiled step)."""

    def __init__(self, enabled: bool, remedy: str, checkpointer: Checkpointer | None = None):
        self.enabled = enabled
        self.remedy = remedy
        self.checkpointer = checkpointer
        self._pending: tuple[int, Mapping, str | None] | None = None

    def dispatched(self, step: int, metrics: Mapping, epoch: str | None = None) -> None:
        """Checks the previous step's metrics and keeps this step's for later."""
        if self._pending is not None:
            self.check(*self._pending)
        self._pending = (step, metrics, epoch)

    def check(self, step: int, metrics: Mapping, epoch: str | None = None) -> None:
        if self.enabled:
            check_finite(step, metrics, self.remedy, self.checkpointer, epoch)
