"""SIGTERM during training: the step finishes, a checkpoint is written, the run exits cleanly."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_checkpoints_and_exits(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "unimedi_jax.main",
        "--config=configs/pretrain.py:tiny",
        f"--workdir={tmp_path}",
        "--config.total_steps=1000",
        "--config.checkpoint_every_steps=1000",
        "--config.log_every_steps=1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 600
    while not logged_steps(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert logged_steps(tmp_path), "training did not start"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output[-3000:]
    assert "SIGTERM received" in output
    assert "Run the same command to resume" in output
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1
    assert saved[0] == max(logged_steps(tmp_path)), (saved, logged_steps(tmp_path))
    assert saved[0] < 1000
