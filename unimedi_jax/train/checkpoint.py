"""Checkpoints: train state and data-iterator state under ``workdir/checkpoints`` (orbax).

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when
complete), so a run killed mid-save resumes from the previous complete checkpoint; the training
run that opens the directory next deletes the leftover temporary directory. A save that fails (full
disk, lost mount) raises CheckpointWriteError naming the step and the last complete checkpoint,
which stays loadable. The data iterator's state travels with the train state so a resumed run
sees exactly the batches it would have seen.

A checkpoint whose files were damaged after it completed (cut short by a full disk, a lost
mount, an interrupted copy) is skipped with one logged line, and the next older readable one is
restored; none is deleted (the training run moves a damaged one to ``damaged-checkpoints/``, as
it will write that step again). Readers create and change nothing in the directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from unimedi_jax.core.errors import UserError

_policies = ocp.checkpoint_managers
DAMAGED_DIR = "damaged-checkpoints"  # beside checkpoints/: where a training run moves them
T = TypeVar("T")


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


class CheckpointReadError(UserError):
    """No checkpoint (or not the one asked for) could be read; lists each step and its error."""


def _reason(err: BaseException) -> str:
    """One line on why a read failed: the innermost error (orbax wraps TensorStore's), short."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class Checkpointer:
    """Checkpoints of (train state, data state) under ``directory``: the latest ``keep``, plus
    every one whose step is a multiple of ``keep_every`` (0: none), for later evaluation.

    ``clean_up`` is for the run that writes here: it creates the directory, deletes unfinished
    saves of a killed run and moves damaged checkpoints it skipped to ``damaged-checkpoints/``.
    Readers leave it off: they create and change nothing (and would delete the save a running
    training is writing).
    """

    def __init__(
        self,
        directory: str | Path,
        keep: int,
        keep_every: int = 0,
        async_save: bool = True,
        clean_up: bool = False,
    ):
        policies = [_policies.LatestN(n=keep)]
        if keep_every > 0:
            policies.append(_policies.EveryNSteps(interval_steps=keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_policies.AnyPreservationPolicy(policies),
            create=clean_up,
            cleanup_tmp_directories=clean_up,
            enable_async_checkpointing=async_save,
        )
        self.directory = Path(directory)
        self._writer = clean_up
        self._manager = ocp.CheckpointManager(
            self.directory.absolute(), options=options, item_names=("state", "data")
        )
        self._pending: int | None = None  # the step of a save still being written

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts an (asynchronous) save; returns once the arrays are copied off device.

        Waits for the previous save first, so its failure is reported before this one starts.
        """
        self.wait()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
                ),
                force=True,
            )
        except Exception as err:  # any write failure: name the step, keep the previous one
            raise self._write_error(step, err) from err
        self._pending = step

    def _write_error(self, step: int | None, err: Exception) -> CheckpointWriteError:
        self._manager.reload()  # forget the step that was never completed
        return CheckpointWriteError(
            f"writing the checkpoint of step {step} to {self.directory} failed "
            f"({type(err).__name__}: {err}). The last complete checkpoint, step "
            f"{self.latest_step()}, is intact and a rerun resumes from it; check the free "
            "space and write permissions of that directory."
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings of ``abstract_state`` (ShapeDtypeStructs with sharding)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def restore_raw(self, step: int) -> dict:
        """The saved train state as a plain tree of host arrays (for inference and export)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return restored["state"]

    def restore_newest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data state) of the newest readable checkpoint, None when there is none;
        see ``restore``. A training run (``clean_up``) moves the damaged ones it skipped aside."""
        found = self._newest_readable(lambda step: self.restore(step, abstract_state))
        return None if found is None else (found[0], *found[1])

    def restore_raw_newest(self, step: int | None = None) -> tuple[int, dict] | None:
        """(step, raw state) of ``step`` alone, or of the newest readable checkpoint; None when
        there is none."""
        return self._newest_readable(self.restore_raw, step)

    def _newest_readable(
        self, read: Callable[[int], T], step: int | None = None
    ) -> tuple[int, T] | None:
        """Tries ``read`` on ``step`` alone, or on every complete step from the newest, until
        one succeeds on every process; CheckpointReadError when none does."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointReadError(
                    f"{self.directory / str(step)} is not a complete checkpoint; the complete "
                    f"ones in {self.directory} are steps {sorted(steps) or 'none'}."
                )
            steps = [step]
        failures: list[tuple[int, str]] = []
        for candidate in steps:
            try:
                result, reason = read(candidate), None
            except Exception as err:  # any read error: a damaged checkpoint
                result, reason = None, _reason(err)
            if jax.process_count() > 1:  # all processes restore the same step, or none does
                read_by = multihost_utils.process_allgather(np.int32(reason is None))
                if reason is None and not np.all(read_by):
                    reason = "another process could not read it"
            if reason is None:
                self._set_aside([s for s, _ in failures])
                return candidate, result
            failures.append((candidate, reason))
            logging.warning(
                "checkpoint step %d in %s is unreadable (%s); trying the next older one",
                candidate,
                self.directory,
                reason,
            )
        if not failures:
            return None
        listed = "; ".join(f"step {s}: {reason}" for s, reason in failures)
        instead = (
            "pass the run's folder instead to fall back to its newest readable checkpoint"
            if step is not None
            else "move the checkpoints folder aside to start the run again at step 0"
        )
        what = f"checkpoint step {step}" if step is not None else "no checkpoint"
        raise CheckpointReadError(
            f"{what} in {self.directory} could {'not ' if step is not None else ''}be read "
            f"({listed}). The files are left as they are: restore them from a copy if you have "
            f"one, or {instead}."
        )

    def _set_aside(self, steps: list[int]) -> None:
        """A training run moves the damaged checkpoints it skipped to
        ``damaged-checkpoints/<step>-<UTC time>``, as it will write those steps again."""
        if not self._writer or not steps:
            return
        if jax.process_index() == 0:
            target = self.directory.parent / DAMAGED_DIR
            target.mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            for step in steps:
                moved = target / f"{step}-{stamp}"
                (self.directory / str(step)).rename(moved)
                logging.warning("moved the unreadable checkpoint of step %d to %s", step, moved)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("damaged checkpoints set aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until the pending save is committed; CheckpointWriteError if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # the asynchronous part of the save failed
            raise self._write_error(step, err) from err

    def close(self) -> None:
        """Waits for the pending save (raising if it failed) and releases the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a live pytree, for ``restore``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
