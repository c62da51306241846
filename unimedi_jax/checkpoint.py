"""Checkpoints: train state and data-iterator state under ``workdir/checkpoints`` (orbax).

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when
complete), so a run killed mid-save resumes from the previous complete checkpoint. The data
iterator's state travels with the train state so a resumed run sees exactly the batches it would
have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of (train state, data state) under ``directory``."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.directory = Path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory.absolute(), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts an (asynchronous) save; returns once the arrays are copied off device."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
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
        """Blocks until pending saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a live pytree, for ``restore``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
