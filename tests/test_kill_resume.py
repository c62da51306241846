"""A run stopped by SIGTERM, by kill -9 inside a checkpoint write and by kill -9 between writes
resumes each time and ends bit for bit where an uninterrupted run ends (CPU, float32).

The training subprocesses share a compilation cache, so only the first one compiles.
Runs with the pause driver (tests/pause_driver.py) stop at exact moments for the kills.
"""

import signal
import sys

import pytest

from tests.tiny_runs import subprocess_env
from unimedi_jax.diagnostics.resume_soak import (
    compare_runs,
    complete_checkpoints,
    log_tail,
    logged_steps,
    run_to_end,
    share_inputs,
    start_run,
    wait_for,
)
from unimedi_jax.train.checkpoint import Checkpointer

ARGS = [
    "--config=configs/pretrain.py:tiny",
    "--config.total_steps=6",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
]
DRIVER = (sys.executable, "tests/pause_driver.py")
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("runs") / "reference"
    run_to_end(workdir, ARGS, env, TIMEOUT_S)
    return workdir


def start_paused(workdir, args, env, pause):
    """The run, stopped at ``pause`` (see tests/pause_driver.py); returns (process, marker)."""
    marker = workdir.with_name(f"{workdir.name}-{pause.replace(':', '-')}.reached")
    pause_env = {**env, "UNIMEDI_PAUSE": pause, "UNIMEDI_PAUSE_MARKER": str(marker)}
    return start_run(workdir, args, pause_env, launcher=DRIVER), marker


def kill_at(workdir, args, env, pause, then=lambda: True):
    """Runs until ``pause`` is reached and ``then()`` holds, then kill -9."""
    proc, marker = start_paused(workdir, args, env, pause)
    try:
        wait_for(lambda: marker.exists() and then(), proc, TIMEOUT_S, pause)
    except RuntimeError as err:
        raise AssertionError(f"{err}\n{log_tail(workdir)}") from None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_sigterm_and_kill_9_at_any_point_resume_bit_for_bit(reference, env, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    args = share_inputs(reference, workdir, ARGS)

    # SIGTERM before step 3: step 3 finishes and is checkpointed off the every-2 grid.
    proc, _ = start_paused(workdir, args, env, "term:3")
    assert proc.wait(timeout=TIMEOUT_S) == 143, log_tail(workdir)
    assert complete_checkpoints(workdir) == [2, 3]
    assert logged_steps(workdir) == [1, 2, 3]

    # Resumed at 3, killed inside the save of step 4: files written, not yet renamed.
    kill_at(workdir, args, env, "save:4")
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("4.")]
    assert leftovers, "the half-written checkpoint of step 4 should be on disk"
    assert complete_checkpoints(workdir) == [2, 3]
    assert Checkpointer(workdir / "checkpoints", keep=3).latest_step() == 3

    # Resumed at 3 again, killed between writes: before step 6, once checkpoint 4 is complete.
    kill_at(workdir, args, env, "batch:6", then=lambda: 4 in complete_checkpoints(workdir))
    assert complete_checkpoints(workdir) == [2, 3, 4]
    assert logged_steps(workdir)[-1] == 5  # step 5 is lost: it is redone from checkpoint 4

    # The last start finishes; its unfinished-save leftovers are gone.
    run_to_end(workdir, args, env, TIMEOUT_S)
    assert not [p for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
    assert complete_checkpoints(workdir) == [3, 4, 6]  # keep_checkpoints=3
    assert logged_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert compare_runs(reference, workdir) == []
