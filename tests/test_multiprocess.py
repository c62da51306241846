"""2 processes x 2 CPU devices (gloo over 127.0.0.1) train, checkpoint and resume exactly like
1 process x 4 devices: the global batch and the step do not depend on the process layout.

The two processes start through launch/cpu_multiprocess.sh, as a person would start them, and
share one workdir: process 0 builds the phantoms and the vocabulary, writes metrics.jsonl alone,
and both write the checkpoints. They train the tiny preset for 4 steps (checkpoints at 2 and 4);
with the checkpoint of step 4 removed, as if the run had stopped after step 3, a second start
resumes at step 3 and must repeat steps 3 and 4 exactly. One process with 4 devices trains the
same 4 steps for reference. Three launches, 3-5 minutes on a loaded 2-core machine.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.fake_devices import fake_device_flags

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "cpu_multiprocess.sh"
STEPS = 4
FLAGS = (
    "--config=configs/pretrain.py:tiny",
    f"--config.total_steps={STEPS}",
    "--config.mesh.data=-1",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=0",
)
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


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["step"] == w["step"]
        for key in KEYS:
            np.testing.assert_allclose(
                g[key], w[key], rtol=1e-5, atol=1e-5, err_msg=f"step {g['step']} {key}"
            )


def test_two_processes_train_and_resume_like_one(tmp_path):
    multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        # LLVM at -O0 halves XLA's compile time on CPU; both layouts compile with it.
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }
    multi_start = ["bash", str(LAUNCHER), "2", *FLAGS, f"--workdir={multi_dir}"]

    run(multi_start, env)
    assert saved_steps(multi_dir) == [2, STEPS]
    first = read_metrics(multi_dir)
    # As if the run had died before its checkpoint at step 4: the next start resumes at step 3.
    shutil.rmtree(multi_dir / "checkpoints" / str(STEPS))
    run(multi_start, env)
    assert saved_steps(multi_dir) == [2, STEPS]

    # The same phantoms, and the vocabulary (a fresh build gives the same; copying saves time).
    shutil.copytree(multi_dir / "tokenizer", single_dir / "tokenizer")
    phantoms = f"--config.data.data_dir={multi_dir / 'data'}"
    single_start = [sys.executable, "-m", "unimedi_jax.main", *FLAGS, phantoms]
    run(
        [*single_start, f"--workdir={single_dir}"],
        {**env, "XLA_FLAGS": f"{env['XLA_FLAGS']} {fake_device_flags(4)}"},
    )

    multi, single = read_metrics(multi_dir), read_metrics(single_dir)
    # One record a step (only process 0 writes): the second start resumed at step 3 and
    # replaced the records of steps 3 and 4 by its own, which equal the first start's.
    assert [m["step"] for m in multi] == [1, 2, 3, 4]
    assert_same_metrics(multi, first)
    assert_same_metrics(multi, single)
