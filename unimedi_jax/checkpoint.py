"""Checkpoints: train state and data-iterator state under ``workdir/checkpoints`` (orbax).

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when
complete), so a run killed mid-save resumes from the previous complete checkpoint; the training
run that opens the directory next deletes the leftover temporary directory. A save that fails (full
disk, lost mount) raises CheckpointWriteError naming the step and the last complete checkpoint,
which stays loadable. The data iterator's state travels with the train state so a resumed run
sees exactly the batches it would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

_policies = ocp.checkpoint_managers


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


class Checkpointer:
    """Checkpoints of (train state, data state) under ``directory``: the latest ``keep``, plus
    every one whose step is a multiple of ``keep_every`` (0: none), for later evaluation.

    ``clean_up`` is for the run that writes here: it deletes unfinished saves of a killed run.
    Readers leave it off, or they would delete the save a running training is writing.
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
            create=True,
            cleanup_tmp_directories=clean_up,
            enable_async_checkpointing=async_save,
        )
        self.directory = Path(directory)
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
