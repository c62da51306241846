"""The device check's step and comparison, on the CPU: bfloat16 against float32 (what a GPU run is
held to), and the verdict's arithmetic; and the dry run of launch/device_check.sh, which runs them
on a GPU machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unimedi_jax.diagnostics.backend_check import (
    LOSS_KEYS,
    loss_verdict,
    relative_errors,
)

ROOT = Path(__file__).resolve().parents[1]


def test_relative_errors():
    reference = {key: 2.0 for key in LOSS_KEYS}
    result = {**reference, "loss": 2.1, "loss_vl": -2.0}
    errors = relative_errors(result, reference)
    assert errors["loss"] == pytest.approx(0.05)
    assert errors["loss_vl"] == pytest.approx(2.0)
    assert errors["loss_icl"] == 0.0


def test_loss_verdict_passes_up_to_the_tolerance():
    reference = {key: 2.0 for key in LOSS_KEYS}
    assert loss_verdict({**reference, "loss": 2.019}, reference, 1e-2)[0]
    failed, line = loss_verdict({**reference, "loss": 2.03, "loss_vl": 9.0}, reference, 1e-2)
    assert not failed
    assert line == "FAIL: relative error of the loss 1.50e-02 (limit 0.01)"


def test_device_script_dry_run_runs_every_part_on_the_cpu(tmp_path):
    """``DRY_RUN=1 launch/device_check.sh``: every part of the GPU check at the tiny config on
    the CPU (the GPU-only tests skip, the peer is not named), ending in the summary table. Its
    step check compares the CPU's bfloat16 step with its float32 step: different numbers
    (bfloat16 was used), yet within the GPU check's limit of 1e-2."""
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(out), "PEER": ""}
    proc = subprocess.run(
        ["bash", "launch/device_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-3000:]
    summary = (out / "summary.md").read_text()
    for part in ("environment", "gpu_tests", "step_accelerator", "variants", "profile"):
        assert f"== {part}: ok" in log, part
    assert "skipped" in summary  # the cuDNN test, on a CPU
    steps = {name: json.loads((out / f"step_{name}.json").read_text()) for name in ("cpu", "gpu")}
    assert [(s["platform"], s["compute_dtype"]) for s in steps.values()] == [
        ("cpu", "float32"),
        ("cpu", "bfloat16"),
    ]
    errors = relative_errors(steps["gpu"], steps["cpu"])
    assert 0 < errors["loss"] < 1e-2, errors
    assert "| term | cpu float32 | cpu bfloat16 | relative error |" in summary.splitlines()
    rows = json.loads((out / "variants.json").read_text())
    assert [(r["variant"], r["remat"], r["batch"]) for r in rows] == [
        ("remat=dots", "dots", [8, 8])
    ]
    assert "| ours: xla, remat dots, scanned | 8 + 8 |" in summary
    assert "relative error" in summary and "(limit 1e-2)" in summary
    assert "| vision forward (student) |" in (out / "profile.md").read_text()
    assert summary.rstrip().endswith("all parts passed")
