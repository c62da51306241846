"""Soak test of exact resume: a run SIGKILLed N times in a row ends where an uninterrupted one does.

The library of ``python -m unimedi_jax.soak``. ``soak(root, main_args, kills)`` trains once
without interruption in ``ROOT/reference`` (``python -m unimedi_jax.main MAIN_ARGS``), then in
``ROOT/killed`` starts the same command and SIGKILLs it, N times in a row, each time at a random
moment: N kill steps are drawn over the run and sorted; each start is killed a random delay of up
to ``max_jitter_s`` (about a step's time or two) after it reports its kill step, so kills land in
steps, in checkpoint writes and between them, or, when its kill step is not ahead of the
checkpoint it resumed from (and at random one time in five), during start-up (restore, compile).
The last start runs to the end. Then it compares the two runs bit for bit: every logged metric of
every step (wall-clock throughput aside) and every array of the final checkpoint, and returns a
summary (machine, date, kills and where each landed, outcome, wall time). The killed run reads
the reference's demo data and vocabulary, and all runs share a compilation cache in
``ROOT/jax_cache``.

The functions here also drive the kill tests (tests/test_kill_resume.py) and the runs other tests
compare bit for bit.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unimedi_jax.train.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[2]
MAIN = (sys.executable, "-m", "unimedi_jax.main")
WALL_CLOCK_METRICS = ("samples_per_sec",)
STARTUP_KILL_PROBABILITY = 0.2


def run_env(cache_dir: Path) -> dict[str, str]:
    """This environment plus a persistent compilation cache shared by every run of a soak
    (a restart then loads the compiled step instead of compiling it again)."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def start_run(
    workdir: Path,
    args: Sequence[str],
    env: dict[str, str],
    launcher: Sequence[str] = MAIN,
) -> subprocess.Popen:
    """Starts ``launcher --workdir=WORKDIR ARGS``; its output is appended to WORKDIR.log."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path(workdir), "a") as log:
        return subprocess.Popen(
            [*launcher, f"--workdir={workdir}", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def log_path(workdir: Path) -> Path:
    return workdir.with_name(workdir.name + ".log")


def log_tail(workdir: Path, chars: int = 3000) -> str:
    path = log_path(workdir)
    return path.read_text()[-chars:] if path.exists() else ""


def steps_done_since(workdir: Path, offset: int) -> int:
    """The last step the run's console reported after byte ``offset`` of its log: the progress
    of the current start (metrics.jsonl still holds the lines of the killed one until the new
    start has restored its checkpoint)."""
    text = log_path(workdir).read_bytes()[offset:].decode("utf-8", "replace")
    steps = re.findall(r"\] step (\d+)/\d+ ", text)
    return int(steps[-1]) if steps else 0


def run_to_end(workdir: Path, args: Sequence[str], env: dict[str, str], timeout_s: float) -> None:
    """Runs the training command to completion; RuntimeError with its log tail if it fails."""
    proc = start_run(workdir, args, env)
    if proc.wait(timeout=timeout_s) != 0:
        raise RuntimeError(f"run in {workdir} exited {proc.returncode}:\n{log_tail(workdir)}")


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen, timeout_s: float, what: str
) -> None:
    """Polls ``condition`` every 20 ms while ``proc`` runs; RuntimeError on timeout or exit."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.02)


def logged_steps(workdir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (a line being written may be incomplete: skipped)."""
    path = workdir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            continue
    return steps


def complete_checkpoints(workdir: Path) -> list[int]:
    """Steps of the complete checkpoints (orbax names one by its step alone)."""
    directory = workdir / "checkpoints"
    names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    return sorted(int(name) for name in names if name.isdigit())


def share_inputs(reference: Path, workdir: Path, args: Sequence[str]) -> list[str]:
    """Arguments for a run in ``workdir`` that reads the reference's demo data, and a copy of
    its from-scratch vocabulary (the same as a fresh build; copied to save building it)."""
    if (reference / "tokenizer").is_dir() and not (workdir / "tokenizer").exists():
        shutil.copytree(reference / "tokenizer", workdir / "tokenizer")
    sets_data = any(a.startswith("--config.data.data_dir=") for a in args)
    if (reference / "data").is_dir() and not sets_data:
        return [*args, f"--config.data.data_dir={reference / 'data'}"]
    return list(args)


def logged_metrics(workdir: Path) -> tuple[dict[int, dict[str, float]], list[int]]:
    """(step -> its logged values, steps logged more than once by the training lines)."""
    metrics: dict[int, dict[str, float]] = {}
    duplicated = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        if "loss" in record and "loss" in metrics.get(step, {}):
            duplicated.append(step)
        metrics.setdefault(step, {}).update(
            {k: v for k, v in record.items() if k not in WALL_CLOCK_METRICS}
        )
    return metrics, duplicated


def checkpoint_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of the train state saved at ``step``, by its path in the state."""
    state = Checkpointer(workdir / "checkpoints", keep=1).restore_raw(step)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def compare_runs(reference: Path, other: Path) -> list[str]:
    """How ``other`` differs from ``reference``: logged metrics of every step and the arrays
    of the final checkpoint, compared bit for bit. Empty when they are equal."""
    want, _ = logged_metrics(reference)
    got, duplicated = logged_metrics(other)
    differences = [f"step {s} logged more than once" for s in sorted(set(duplicated))]
    if sorted(got) != sorted(want):
        differences.append(f"logged steps {sorted(got)} != {sorted(want)}")
    for step in sorted(set(got) & set(want)):
        for key in sorted(got[step].keys() | want[step].keys()):
            if got[step].get(key) != want[step].get(key):
                differences.append(
                    f"step {step} {key}: {got[step].get(key)!r} != {want[step].get(key)!r}"
                )
    last_want, last_got = complete_checkpoints(reference)[-1:], complete_checkpoints(other)[-1:]
    if last_got != last_want:
        return [*differences, f"final checkpoint {last_got} != {last_want}"]
    arrays_want = checkpoint_arrays(reference, last_want[0])
    arrays_got = checkpoint_arrays(other, last_got[0])
    if arrays_got.keys() != arrays_want.keys():
        return [*differences, "the final checkpoints hold different arrays"]
    for path, array in arrays_want.items():
        theirs = arrays_got[path]
        if theirs.dtype != array.dtype or theirs.tobytes() != array.tobytes():
            differences.append(f"final state {path} differs")
    return differences


def _kill_once(
    workdir: Path,
    args: Sequence[str],
    env: dict[str, str],
    target: int | None,
    delay_s: float,
    timeout_s: float,
) -> dict[str, Any] | None:
    """Starts the run and SIGKILLs it ``delay_s`` after it reports step ``target`` (None:
    after its start); None if it finished first. The record notes how long the start took to
    report its first step (``startup_s``) when it got there."""
    resumed_from = max(complete_checkpoints(workdir), default=0)
    offset = log_path(workdir).stat().st_size
    proc = start_run(workdir, args, env)
    started = time.monotonic()
    startup_s = None
    if target is not None:
        try:
            for step in (1, target):
                wait_for(
                    lambda step=step: steps_done_since(workdir, offset) >= step,
                    proc,
                    timeout_s,
                    f"step {step}",
                )
                startup_s = startup_s or time.monotonic() - started
        except RuntimeError:
            if proc.poll() != 0:
                raise RuntimeError(f"run exited {proc.returncode}:\n{log_tail(workdir)}") from None
    time.sleep(delay_s)
    if proc.poll() is not None:
        if proc.returncode == 0:
            return None
        raise RuntimeError(f"run exited {proc.returncode}:\n{log_tail(workdir)}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {
        "resumed_from": resumed_from,
        "aimed": "start-up" if target is None else f"{delay_s:.2f}s after step {target}",
        "after_s": round(time.monotonic() - started, 2),
        "last_step_done": steps_done_since(workdir, offset),
        "complete_checkpoints": complete_checkpoints(workdir),
        "startup_s": None if startup_s is None else round(startup_s, 2),
    }


def soak(
    root: Path,
    main_args: Sequence[str],
    kills: int,
    seed: int = 0,
    max_jitter_s: float = 1.0,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Runs the soak described in the module docstring; returns its summary."""
    started = time.monotonic()
    rng = random.Random(seed)
    env = run_env(root / "jax_cache")
    reference, killed = root / "reference", root / "killed"
    for path in (reference, killed):
        shutil.rmtree(path, ignore_errors=True)
        log_path(path).unlink(missing_ok=True)
    run_to_end(reference, main_args, env, timeout_s)
    reference_s = time.monotonic() - started
    total_steps = max(logged_steps(reference))
    killed.mkdir(parents=True)
    log_path(killed).touch()
    args = share_inputs(reference, killed, main_args)
    startup_s = reference_s / 4  # until a start has shown how long a restart takes
    kill_log = []
    # Sorted kill steps spread the kills over the whole run; each start resumes before its own.
    for target in sorted(rng.randint(1, total_steps - 1) for _ in range(kills)):
        resumed_from = max(complete_checkpoints(killed), default=0)
        if target <= resumed_from or rng.random() < STARTUP_KILL_PROBABILITY:
            record = _kill_once(killed, args, env, None, rng.uniform(0, startup_s), timeout_s)
        else:
            delay = rng.uniform(0, max_jitter_s)
            record = _kill_once(killed, args, env, target, delay, timeout_s)
        if record is None:  # it reached the end before the kill
            break
        kill_log.append(record)
        startup_s = record["startup_s"] or startup_s
    run_to_end(killed, args, env, timeout_s)
    differences = compare_runs(reference, killed)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
        "command": " ".join(["python -m unimedi_jax.main", *main_args]),
        "kills_asked": kills,
        "kills": len(kill_log),
        "kill_log": kill_log,
        "total_steps": total_steps,
        "outcome": "equal" if not differences else "DIFFERENT",
        "differences": differences[:20],
        "reference_run_s": round(reference_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
