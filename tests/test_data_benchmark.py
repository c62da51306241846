"""data_pipelines.benchmark: the command of docs/data.md runs, on the trainer's own config."""

import re
import subprocess
import sys
from pathlib import Path

from configs.pretrain import get_config

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_command_runs_at_tiny_sizes(tmp_path):
    """The command end to end on the tiny preset; a command-line override of a trainer field
    (batch.size_3d) reaches the timed stream."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.benchmark",
            "--config=configs/pretrain.py:tiny",
            "--config.batch.size_3d=4",
            f"--data_dir={tmp_path / 'data'}",
            "--stored_image_size=40",
            "--num_train=16",
            "--workers=0",
            "--runs=1",
            "--steps=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rates = dict(
        re.findall(r"^(\dd batch \d+ workers 0): +([\d.]+) samples/s", result.stdout, re.M)
    )
    assert set(rates) == {"2d batch 8 workers 0", "3d batch 4 workers 0"}, result.stdout
    assert all(float(r) > 0 for r in rates.values())


def test_stream_config_keeps_every_trainer_field():
    """Only the sources, data_dir and worker count are replaced: a field added to the trainer's
    config later (as data.max_failure_fraction was) reaches the benchmark's streams."""
    from data_pipelines.benchmark import stream_config

    config = get_config("tiny")
    config.data.a_later_field = 0.25
    c = stream_config(config, "/some/dir", "3d", 2)
    replaced = {"data_dir": "/some/dir", "sources_2d": "", "sources_3d": "phantoms"}
    assert c.data.to_dict() == {**config.data.to_dict(), **replaced, "worker_count": 2}
    assert {k: v for k, v in c.to_dict().items() if k != "data"} == {
        k: v for k, v in config.to_dict().items() if k != "data"
    }


def test_importing_it_beside_the_trainer_benchmark_defines_no_second_flag():
    """Both benchmark modules in one process, as a test session imports them: the input
    benchmark defines its flags only when it runs as a command (no DuplicateFlagError)."""
    code = "import unimedi_jax.benchmark, data_pipelines.benchmark"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
