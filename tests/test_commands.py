"""The command lines the README and docs show, run as written (absl flags, positional figure
names and paths, arguments after ``--``) on a tiny run; the library behind each command has its
own tests (test_export, test_visualize, test_results_table, test_kill_resume)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.test_results_table import EVAL_FILES
from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax.trainers.pretraining import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**subprocess_env(), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A folder holding ``runs/demo``, a two-step tiny run, as the README's lines expect."""
    root = tmp_path_factory.mktemp("readme")
    train(tiny_run_config(root / "data", total_steps=2), root / "runs" / "demo")
    return root


def _command(env, cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_export_readme_line(demo, env):
    proc = _command(
        env,
        demo,
        "unimedi_jax.export",
        "--workdir=runs/demo",
        "--format=monai",
        "--out=export/monai",
    )
    assert proc.stdout.strip() == "wrote export/monai"
    config = json.loads((demo / "export" / "monai" / "config.json").read_text())
    assert config["kwargs"]["img_size"] == [8, 32, 32]  # the training size
    assert (demo / "export" / "monai" / "model.safetensors").is_file()


def test_export_size_and_channels_flags(demo, env, tmp_path):
    out = tmp_path / "timm"
    args = ["--workdir=runs/demo", "--format=timm", f"--out={out}", "--size=48,48"]
    _command(env, demo, "unimedi_jax.export", *args, "--in_chans=3")
    model_args = json.loads((out / "config.json").read_text())["model_args"]
    assert model_args["img_size"] == [48, 48]
    assert model_args["in_chans"] == 3


def test_visualize_readme_line(demo, env):
    proc = _command(
        env, demo, "unimedi_jax.visualize", "slices", "--workdir=runs/demo", "--out=slices.png"
    )
    assert proc.stdout.strip() == "wrote slices.png"
    with Image.open(demo / "slices.png") as image:
        assert image.format == "PNG"


def test_results_table_readme_line(tmp_path):
    for directory, content in EVAL_FILES.items():
        (tmp_path / "runs" / directory).mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / directory / "eval.json").write_text(json.dumps(content))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = _command(env, tmp_path, "unimedi_jax.results_table", "runs/paper")
    assert proc.stdout.startswith("### Table 1: linear probe, 2D")
    assert "| paper @1000 |" in proc.stdout and "demo @" not in proc.stdout


def test_soak_passes_what_follows_the_double_dash_to_training(demo, env, tmp_path):
    """docs/reliability.md's soak line with no kills: both runs get the training flags after ``--``
    (2 steps, the tiny preset, the prepared data) and end equal."""
    proc = _command(
        env,
        ROOT,
        "unimedi_jax.soak",
        f"--root={tmp_path}",
        "--kills=0",
        "--",
        "--config=configs/pretrain.py:tiny",
        "--config.total_steps=2",
        "--config.eval_every_steps=0",
        f"--config.data.data_dir={demo / 'data'}",
    )
    summary = json.loads(proc.stdout)
    assert summary["outcome"] == "equal" and summary["total_steps"] == 2
    assert summary["command"].startswith("python -m unimedi_jax.main --config=configs/pretrain.py")
