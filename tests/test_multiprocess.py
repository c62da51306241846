"""2 processes x 2 CPU devices (gloo over 127.0.0.1) train, checkpoint and resume exactly like
1 process x 4 devices: the global batch and the step do not depend on the process layout.

Each layout trains the tiny preset for 2 steps (checkpoint at 2), then a second start in the
same workdir resumes to step 4. The two processes go through launch/cpu_multiprocess.sh, as a
person would start them. About a minute a launch on a loaded 2-core machine, four launches.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "cpu_multiprocess.sh"

# LLVM at -O0 halves XLA's CPU compile time; every layout uses it, and the losses are unchanged.
FAST_COMPILE = "--xla_backend_optimization_level=0"
FLAGS = (
    "--config=configs/pretrain.py:tiny",
    "--config.mesh.data=-1",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=0",
)
PHASES = (2, 4)  # total_steps of the first start, then of the resumed one
KEYS = ("loss", "loss_vl", "loss_icl", "loss_pcl", "learning_rate", "grad_norm")
TIMEOUT_S = 600


def run(command: list[str], env: dict[str, str]) -> None:
    """Runs ``command`` in its own process group, so a hang kills every process it started."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{command} ran over {TIMEOUT_S}s:\n{output[-4000:]}") from None
    assert proc.returncode == 0, f"{command} failed:\n{output[-6000:]}"


def train_and_resume(launch: list[str], workdir: Path, env: dict[str, str], *flags: str) -> list:
    """The metrics.jsonl records of a first start and a resumed one in ``workdir``."""
    for total_steps in PHASES:
        steps = f"--config.total_steps={total_steps}"  # --config.* only after --config
        run([*launch, *FLAGS, steps, f"--workdir={workdir}", *flags], env)
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_and_resume_like_one(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"

    multi = train_and_resume(
        ["bash", str(LAUNCHER), "2"], multi_dir, {**env, "XLA_FLAGS": FAST_COMPILE}
    )
    single = train_and_resume(
        [sys.executable, "-m", "unimedi_jax.main"],
        single_dir,
        {**env, "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=4"},
        f"--config.data.data_dir={multi_dir / 'data'}",  # the phantoms process 0 built
    )

    steps = list(range(1, PHASES[-1] + 1))
    # One record a step: only process 0 writes metrics, and the second start resumed at step 3.
    assert [m["step"] for m in multi] == steps
    assert [m["step"] for m in single] == steps
    saved = sorted(int(p.name) for p in (multi_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 4]
    for got, want in zip(multi, single, strict=True):
        for key in KEYS:
            np.testing.assert_allclose(
                got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=f"step {got['step']} {key}"
            )
