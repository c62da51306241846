"""What a user meets on a trained run: relative and absolute paths behave alike (the refusal of
a shape change included), one result per evaluated checkpoint, the commands' help and output.
One tiny run, trained once for the module; the tests that change a run work on a copy."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from tests.tiny_runs import ROOT, subprocess_env, tiny_run_config
from unimedi_jax import inference
from unimedi_jax.config.checks import ConfigError
from unimedi_jax.core.overrides import apply_overrides, parse_flags
from unimedi_jax.evaluation.checkpoint_results import write_checkpoint_result
from unimedi_jax.evaluation.evaluators import evaluate_checkpoint
from unimedi_jax.evaluation.figures import (
    curves_figure,
    masking_figure,
    read_phases,
    read_training_log,
    slices_figure,
)
from unimedi_jax.interop.torch_export import export_run
from unimedi_jax.train.loop import phase_starts
from unimedi_jax.trainers.pretraining import train


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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


def test_relative_workdir_resumes_and_the_phases_are_logged_and_drawn(root, run_copy, caplog):
    """Step 3 of 3 (warm-up 2 steps, the last quarter unmasked) starts both later phases."""
    caplog.set_level("INFO")
    train(tiny_run_config(root / "data", total_steps=3), run_copy)
    assert "no readable metadata" not in caplog.text
    assert "Resumed from" in caplog.text and "at step 2" in caplog.text
    assert (Path(run_copy) / "checkpoints" / "3").is_dir()
    assert "Finished 1 step in" in caplog.text and "the run is at step 3" in caplog.text
    assert "step 3: warm-up over" in caplog.text
    assert "step 3: unmasked tuning to the end" in caplog.text and "L_pcl" in caplog.text
    phases = read_phases(run_copy)
    assert phases == {"warm-up over": 3, "unmasked tuning": 3}
    figure = curves_figure({"run": read_training_log(run_copy)}, {"run": phases})
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "unmasked tuning from step 3" in legend and "warm-up over from step 3" in legend


def test_phases_start_after_the_warm_up_and_at_the_unmasked_quarter():
    starts = phase_starts(lambda step: step < 750, 1000, 100)
    assert [key for key, _ in starts[101]] == ["phase/warmup_over"]
    assert [key for key, _ in starts[751]] == ["phase/unmasked_tuning"]
    assert sorted(starts) == [101, 751]
    assert phase_starts(lambda step: True, 1000, 0) == {}


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

    exported = export_run(earlier, "hf_bert", tmp_path / "step1")
    assert (exported / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    card = (exported / "README.md").read_text()
    assert "checkpoint step 1." in card
    name = "retrieval_image/image_to_text/R@1"
    assert f"| {name} | {figures[name]:.4f} |" in card
    card = (export_run(run_copy, "hf_bert", tmp_path / "step2") / "README.md").read_text()
    assert "checkpoint step 2." in card and name not in card
    assert "No evaluation of step 2 in the run" in card


# A command as a user without PyTorch runs it (transformers then finds no torch).
_WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ (\S+\.py):\d+\] (.*)")
OWN_FILES = {
    path.name
    for folder in ("unimedi_jax", "data_pipelines")
    for path in (ROOT / folder).rglob("*.py")
}


def test_commands_print_our_lines_only_and_each_result_once(root, tmp_path):
    run, train_run = tmp_path / "run", tmp_path / "train"
    shutil.copytree(root / "runs" / "demo", run)
    shutil.copytree(root / "runs" / "demo", train_run)
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "xray.png")
    commands = {
        "train": [
            "unimedi_jax.main",
            "--config=configs/pretrain.py:tiny",
            f"--workdir={train_run}",
            "--config.total_steps=3",
            "--config.checkpoint_every_steps=1",
            "--config.eval_every_steps=3",
            "--config.eval_limit=8",
            f"--config.data.data_dir={root / 'data'}",
        ],
        "evaluate": ["unimedi_jax.evaluate", f"--workdir={run}", f"--out={tmp_path / 'eval'}"],
        "export": ["unimedi_jax.export", f"--workdir={run}", "--format=torch", "--out=export"],
        "visualize": ["unimedi_jax.visualize", "slices", f"--workdir={run}", "--out=s.png"],
        "embed": ["unimedi_jax.embed", f"--workdir={run}", "--out=e.npz", "xray.png"],
    }
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu"}
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", _WITHOUT_TORCH, *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, stderr[-3000:])
        assert "PyTorch was not found" not in stdout + stderr, name
        for line in stderr.splitlines():
            found = _ABSL_LINE.match(line)
            if found and found[1] == "I":
                assert found[2] in OWN_FILES, (name, line)
        if name == "evaluate":
            figures = json.loads((tmp_path / "eval" / "eval.json").read_text())
            for figure in figures:
                assert (stdout + stderr).count(f"{figure} ") == 1, figure
        if name == "visualize":
            with Image.open(tmp_path / "s.png") as image:
                assert image.text["Title"] == "run, step 2, test split"  # cwd-relative
        if name == "train":
            block = stderr.split("eval at step 3")[1].split("\n")
            assert "figures in metrics.jsonl" in block[0]
            shown = [line for line in block[1:] if line.startswith("  ")]
            assert 1 <= len(shown) <= 6 and all(len(line) < 120 for line in shown), shown


def test_a_wrong_preset_is_one_paragraph_without_a_traceback():
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
    with pytest.raises(ConfigError) as error:
        parse_flags(flag_values, ["prog", f"--config={ROOT}/configs/pretrain.py:dem"])
    assert "unknown preset 'dem'" in str(error.value) and "Traceback" not in str(error.value)


def test_config_path_fields_are_absolute_whatever_the_working_directory(tmp_path, monkeypatch):
    """``--config.data.data_dir=data`` names the folder under the working directory of the
    command, in the config the run saves too: a later command from elsewhere finds it."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "prog",
        f"--config={ROOT}/configs/pretrain.py:demo",
        "--config.data.data_dir=data",
        "--config.text.path=~/bert",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    parse_flags(flag_values, argv)
    assert flag_values.config.data.data_dir == str(tmp_path / "data")
    assert flag_values.config.text.path == os.path.join(os.path.expanduser("~"), "bert")

    flag_values = flags.FlagValues()  # nothing named: nothing to resolve
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
    parse_flags(flag_values, ["prog", f"--config={ROOT}/configs/pretrain.py:demo"])
    assert (flag_values.config.data.data_dir, flag_values.config.text.path) == ("", "")

    saved = ml_collections.ConfigDict({"data": {"data_dir": "/d"}, "text": {"path": ""}})
    changed = apply_overrides(saved, ["--config.data.data_dir=../d", "--config.text.path=b"])
    assert changed.data.data_dir == str(tmp_path.parent / "d")
    assert changed.text.path == str(tmp_path / "b")


def test_what_the_readme_commands_write_in_a_checkout_is_ignored(tmp_path):
    paths = ["export/torch/model.safetensors", "slices.png", "curves.png", "embeddings.npz"]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout.split() == paths


def _legend_texts(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_masking_figure_keys_the_masked_patches_and_the_attention_it_shows():
    rng = np.random.default_rng(0)
    figure = masking_figure(rng.random((2, 32, 32)), rng.random((2, 16)), (4, 4), 0.5, ["a", "b"])
    assert "masked patch (hidden from the student)" in _legend_texts(figure)
    assert figure.axes[2].get_title() == "EMA teacher's [CLS] attention"
    (bar,) = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert bar.get_ylabel() == "attention (Eq. 1), within each X-ray"


def test_slices_figure_labels_the_score_by_what_it_is():
    rng = np.random.default_rng(0)
    lesion = np.zeros((1, 8), bool)
    lesion[0, 3:5] = True
    figure = slices_figure(rng.random((1, 8, 32, 32)), [[3, 4]], rng.random((1, 8)), ["r"], lesion)
    assert figure.axes[1].get_ylabel() == "[CLS] attention\nto the slice"
    assert "mean [CLS] attention of its tokens" in _legend_texts(figure)
