"""What a user meets on a trained run: relative and absolute paths behave alike (the refusal of
a shape change included), one result per evaluated checkpoint, the commands' help and output.
One tiny run, trained once for the module; the tests that change a run work on a copy."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax import inference
from unimedi_jax.config.checks import ConfigError
from unimedi_jax.evaluation.checkpoint_results import write_checkpoint_result
from unimedi_jax.evaluation.evaluators import evaluate_checkpoint
from unimedi_jax.interop.torch_export import export_run
from unimedi_jax.trainers.pretraining import train


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by its path, as a digest of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding ``data`` (tiny phantoms) and ``runs/demo``, a two-step tiny run with a
    checkpoint at each step."""
    root = tmp_path_factory.mktemp("everyday")
    config = tiny_run_config(root / "data", total_steps=2, checkpoint_every_steps=1)
    train(config, root / "runs" / "demo")
    return root


@pytest.fixture
def run_copy(root, tmp_path, monkeypatch) -> str:
    """A copy of the tiny run, named by a path relative to the working directory."""
    shutil.copytree(root / "runs" / "demo", tmp_path / "runs" / "copy")
    monkeypatch.chdir(tmp_path)
    return "runs/copy"


def test_relative_workdir_with_a_shape_change_is_refused_and_the_run_left_as_it_was(root, run_copy):
    before = _snapshot(Path(run_copy))
    config = tiny_run_config(root / "data", total_steps=3)
    config.model.mlp_dim = 128
    with pytest.raises(ConfigError, match=r"model\.mlp_dim 64 -> 128"):
        train(config, run_copy)
    assert _snapshot(Path(run_copy)) == before


def test_relative_workdir_resumes(root, run_copy, caplog):
    caplog.set_level("INFO")
    train(tiny_run_config(root / "data", total_steps=3), run_copy)
    assert "no readable metadata" not in caplog.text
    assert "Resumed from" in caplog.text and "at step 2" in caplog.text
    assert (Path(run_copy) / "checkpoints" / "3").is_dir()


def test_the_command_with_a_relative_workdir_refuses_a_shape_change_with_exit_2(root, run_copy):
    before = _snapshot(Path(run_copy))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unimedi_jax.main",
            "--config=configs/pretrain.py:tiny",
            f"--workdir={run_copy}",
            "--config.total_steps=3",
            "--config.eval_every_steps=0",
            f"--config.data.data_dir={root / 'data'}",
            "--config.model.mlp_dim=128",
        ],
        env={**subprocess_env(), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.mlp_dim 64 -> 128" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(Path(run_copy)) == before


def test_each_evaluated_step_keeps_its_own_result(tmp_path):
    """The newest checkpoint's result is eval.json, an earlier one's eval-step<N>.json; once the
    run has trained on, the older eval.json is kept under its step's name."""
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "2").mkdir()
    write_checkpoint_result(tmp_path, tmp_path, {"step": 2, "a": 0.5})
    write_checkpoint_result(tmp_path, tmp_path, {"step": 1, "a": 0.25})
    assert json.loads((tmp_path / "eval.json").read_text()) == {"step": 2, "a": 0.5}
    assert json.loads((tmp_path / "eval-step1.json").read_text()) == {"step": 1, "a": 0.25}
    (tmp_path / "checkpoints" / "3").mkdir()
    write_checkpoint_result(tmp_path, tmp_path, {"step": 3, "a": 0.75})
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "eval-step2.json").read_text()) == {"step": 2, "a": 0.5}


def test_model_cards_quote_the_figures_of_the_step_they_export(root, run_copy, tmp_path):
    config = inference.load_config(Path(run_copy))
    config.update(evals=("retrieval",), eval_limit=8)
    earlier = Path(run_copy) / "checkpoints" / "1"
    written = write_checkpoint_result(run_copy, run_copy, evaluate_checkpoint(earlier, config))
    assert written == Path(run_copy) / "eval-step1.json"
    assert not (Path(run_copy) / "eval.json").exists()
    figures = json.loads(written.read_text())
    assert figures["step"] == 1

    card = (export_run(earlier, "hf_bert", tmp_path / "step1") / "README.md").read_text()
    assert "checkpoint step 1." in card
    name = "retrieval_image/image_to_text/R@1"
    assert f"| {name} | {figures[name]:.4f} |" in card
    card = (export_run(run_copy, "hf_bert", tmp_path / "step2") / "README.md").read_text()
    assert "checkpoint step 2." in card and name not in card
    assert "No evaluation of step 2 in the run" in card
