"""A checkpoint write that fails (full disk, lost permissions) is reported with the step and the
last complete checkpoint, which stays loadable; an unfinished save is never picked up."""

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import atomicity

from tests.tiny_runs import tiny_run_config
from unimedi_jax.train.checkpoint import Checkpointer, CheckpointWriteError, abstract_like
from unimedi_jax.trainers.pretraining import train


def fail_rename_of(monkeypatch, step: int) -> None:
    """Saves of ``step`` write their files, then fail where orbax would rename them into place
    (the asynchronous part of a save, as a full disk would make it fail)."""
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step):
            raise OSError(28, "No space left on device")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def test_failed_background_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    fail_rename_of(monkeypatch, 2)
    checkpointer = Checkpointer(tmp_path, keep=3)
    state = {"w": jnp.arange(4.0)}
    checkpointer.save(1, state, {"step": 1})
    checkpointer.save(2, {"w": state["w"] + 1}, {"step": 2})
    with pytest.raises(
        CheckpointWriteError,
        match=r"checkpoint of step 2 to .* failed \(OSError: .*No space left on device\)\. "
        r"The last complete checkpoint, step 1, is intact",
    ):
        checkpointer.wait()
    assert checkpointer.latest_step() == 1
    checkpointer.close()
    assert "2.orbax-checkpoint-tmp" in {p.name for p in tmp_path.iterdir()}

    monkeypatch.undo()
    reopened = Checkpointer(tmp_path, keep=3, clean_up=True)  # as a resumed run opens it
    assert reopened.latest_step() == 1
    deadline = time.monotonic() + 30  # orbax deletes the leftover in a background thread
    while len(list(tmp_path.iterdir())) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    restored, data_state = reopened.restore(1, abstract_like(state))
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert data_state == {"step": 1}


def test_failed_write_start_is_reported(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
    checkpointer.save(1, {"w": jnp.zeros(2)}, {"step": 1})

    def refuse(self, step, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(ocp.CheckpointManager, "save", refuse)
    with pytest.raises(CheckpointWriteError, match=r"step 3 .*PermissionError.* step 1, is"):
        checkpointer.save(3, {"w": jnp.ones(2)}, {"step": 3})
    monkeypatch.undo()
    checkpointer.close()
    assert Checkpointer(tmp_path, keep=3).latest_step() == 1


def test_training_run_reports_a_failed_checkpoint(tmp_path, monkeypatch):
    config = tiny_run_config(tmp_path / "data", total_steps=4, checkpoint_every_steps=2)
    workdir = tmp_path / "run"
    fail_rename_of(monkeypatch, 4)
    with pytest.raises(CheckpointWriteError, match=r"step 4 .* step 2, is intact and a rerun"):
        train(config, workdir)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    state = Checkpointer(workdir / "checkpoints", keep=3).restore_raw(2)
    assert int(state["step"]) == 2
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"]))


def test_damaged_newest_checkpoint_is_skipped_and_kept(tmp_path, caplog):
    writer = Checkpointer(tmp_path / "checkpoints", keep=3, clean_up=True)
    for step in (1, 2, 3):
        writer.save(step, {"w": jnp.arange(256.0) + step}, {"step": step})
    writer.close()
    for path in (tmp_path / "checkpoints" / "3").rglob("*"):
        if path.parent.name == "d":  # the array files: cut short, as by a full disk
            os.truncate(path, path.stat().st_size // 2)

    reader = Checkpointer(tmp_path / "checkpoints", keep=3)
    with caplog.at_level(logging.WARNING):
        step, state = reader.restore_raw_newest()
    assert step == 2
    np.testing.assert_array_equal(state["w"], np.arange(256.0) + 2)
    (line,) = [r.getMessage() for r in caplog.records if "step 3" in r.getMessage()]
    assert line.startswith("checkpoint step 3 in ") and "OUT_OF_RANGE" in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]

    # The training run restores onto its state's shardings and moves the damaged one aside.
    resumed = Checkpointer(tmp_path / "checkpoints", keep=3, clean_up=True)
    step, state, data_state = resumed.restore_newest(abstract_like({"w": jnp.zeros(256)}))
    assert (step, data_state) == (2, {"step": 2})
    np.testing.assert_array_equal(state["w"], np.arange(256.0) + 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    (moved,) = (tmp_path / "damaged-checkpoints").iterdir()
    assert moved.name.startswith("3-")
    resumed.save(3, {"w": jnp.zeros(256)}, {"step": 3})  # the step can be written again
    resumed.close()


def test_reader_of_a_missing_directory_creates_nothing(tmp_path):
    reader = Checkpointer(tmp_path / "checkpoints", keep=3)
    assert reader.restore_raw_newest() is None
    reader.close()
    assert list(tmp_path.iterdir()) == []
