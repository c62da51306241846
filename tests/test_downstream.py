"""The downstream protocol on a tiny trained run: the linear probe (configs/probe.py,
evaluation.downstream, ``python -m unimedi_jax.evaluate --config=configs/probe.py:...``) on
phantoms, and full fine-tuning (``python -m unimedi_jax.finetune``) on a CC-CCII fixture."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from configs import probe as probe_config
from data_pipelines import finetune_epochs, sources, synthetic_phantoms, transforms
from data_pipelines.prepare import ensure_prepared
from tests import test_visualize
from tests.test_builders_downstream import _image
from unimedi_jax import inference
from unimedi_jax.evaluation import downstream, linear_probe
from unimedi_jax.evaluation.evaluators import evaluate_checkpoint
from unimedi_jax.evaluation.tasks import ProtocolError
from unimedi_jax.train.loop import NonFiniteLossError
from unimedi_jax.train.preemption import Preempted
from unimedi_jax.trainers import by_kind
from unimedi_jax.trainers.finetuning import finetune

ROOT = Path(__file__).resolve().parents[1]
run = test_visualize.run  # the tiny trained run (a module-scoped fixture), reused
STORED = 40  # stored X-ray side: larger than the tiny model's 32 crop, so the crop is exercised


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, run):
    data_dir = tmp_path_factory.mktemp("probe-data")
    config = inference.load_config(run)
    ensure_prepared(
        "phantoms",
        data_dir,
        image_size=STORED,
        volume_shape=tuple(config.model.volume_size),
        num_train=40,
        num_validation=12,
        num_test=12,
    )
    return data_dir


@pytest.fixture(scope="module")
def model(run):
    return inference.load(run)


def _config(arg, data_dir):
    config = probe_config.get_config(arg)
    config.data.data_dir = str(data_dir)
    config.probe.max_epochs = 8
    return config


def test_probe_config_defaults_and_paper_exceptions():
    config = probe_config.get_config("dataset=chexpert,fraction=0.01")
    assert (config.kind, config.dataset, config.fractions) == ("probe", "chexpert", (0.01,))
    assert config.probe.to_dict() == {
        "learning_rate": 5e-4,
        "weight_decay": 1e-6,
        "batch_size": 48,
        "max_epochs": 50,
        "patience": 10,
    }
    assert not config.random_init and not config.features.with_slices
    assert config.data.data_dir == "/data/tfds"
    assert probe_config.get_config("dataset=covidx").fractions == (0.01, 0.1, 1.0)
    assert probe_config.get_config("dataset=covidx").probe.learning_rate == 5e-3
    assert probe_config.get_config("dataset=cc_ccii,fraction=1").probe.batch_size == 8
    assert finetune_config.get_config("dataset=cc_ccii").train.epochs == 50
    assert finetune_config.get_config("dataset=luna16").train.epochs == 100


@pytest.mark.parametrize(
    ("module", "arg", "message"),
    [
        (probe_config, "dataset=chexpert,frac=1", "bad argument 'frac=1'.*keys: dataset, fraction"),
        (probe_config, "fraction=0.1", "needs a dataset.*chexpert"),
        (probe_config, "dataset=chexpert,fraction=0.5", "0.01, 0.1, 1.0"),
        (probe_config, "dataset=mimic_cxr_jpg", "not a labelled dataset; valid: phantoms/xray"),
        (probe_config, "dataset=phantoms", "not a labelled dataset.*phantoms/ct"),
        (finetune_config, "dataset=chexpert", "not a labelled 3d dataset; valid: phantoms/ct, cc"),
    ],
)
def test_config_errors_name_the_file_and_the_valid_choices(module, arg, message):
    with pytest.raises(ProtocolError, match=message) as err:
        module.get_config(arg)
    assert module.FILE in str(err.value)


def test_probe_feeds_the_inference_features_of_each_split(run, model, data_dir, monkeypatch):
    seen = {}

    def spy(features, *args, **kwargs):
        seen.update(features)
        return original(features, *args, **kwargs)

    original = linear_probe.run_probe
    monkeypatch.setattr(linear_probe, "run_probe", spy)
    config = _config("dataset=phantoms/xray", data_dir)
    config.limit.train = 30
    results = downstream.probe(config, run / "checkpoints" / "2")

    assert results["step"] == 2 and results["encoder"] == "pretrained"
    assert results["splits"] == {"train": 30, "val": 12, "test": 12}
    for role, split in (("train", "train"), ("test", "test")):
        reader = sources.open_source("phantoms/xray", data_dir, split=split).open()
        records = list(reader)[: len(seen[role][1])]
        images = np.stack([transforms.eval_transform_2d(r["image"], 32) for r in records])
        np.testing.assert_allclose(seen[role][0], model.image_features(images), atol=1e-5)
        np.testing.assert_array_equal(seen[role][1], [r["labels"] for r in records])


def test_in_loop_probe_evaluator_equals_the_probe_cli_path(run, data_dir):
    """`evals=("linear_probe",)` (in-loop and `evaluate --workdir`) gives the figures of
    `downstream.probe` on the same records, for both modalities and every fraction."""
    config = inference.load_config(run)
    config.update(evals=("linear_probe",), eval_limit=12, probe_train_limit=30)
    config.data.data_dir = str(data_dir)
    found = evaluate_checkpoint(run / "checkpoints" / "2", config)

    for key, dataset in (("image", "phantoms/xray"), ("volume", "phantoms/ct")):
        probe = _config(f"dataset={dataset}", data_dir)
        probe.probe.max_epochs = linear_probe.ProbeConfig().max_epochs
        probe.limit.update(train=30, val=12, test=12)
        expected = downstream.probe(probe, run / "checkpoints" / "2")["fractions"]
        for fraction in ("0.01", "0.1", "1.0"):
            name = f"linear_probe_{key}/auroc@{float(fraction):g}"
            assert found[name] == pytest.approx(expected[fraction]["auroc"], abs=1e-6), name


def test_random_init_keeps_the_architecture_with_new_vision_weights(run, model):
    images = np.random.default_rng(0).random((4, 32, 32), dtype=np.float32)
    trained, fresh = model, inference.load(run, random_init=True)
    assert fresh.step == trained.step
    shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]
    assert shapes(fresh.teacher["vision"]) == shapes(trained.teacher["vision"])
    assert not np.allclose(fresh.image_features(images), trained.image_features(images))
    jax.tree.map(np.testing.assert_array_equal, fresh.student["text"], trained.student["text"])


def _cli(module, *args):
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_writes_eval_json_under_the_run(run, data_dir):
    proc = _cli(
        "unimedi_jax.evaluate",
        "--config=configs/probe.py:dataset=phantoms/ct,fraction=0.1",
        f"--config.data.data_dir={data_dir}",
        "--config.random_init=True",
        "--config.probe.max_epochs=4",
        f"--workdir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "probe" / "phantoms_ct-0.1-random_init" / "eval.json"
    results = json.loads(out.read_text())
    assert results["kind"] == "probe" and results["encoder"] == "random_init"
    assert results["dataset"] == "phantoms/ct" and results["task"] == "multilabel"
    assert results["classes"] == list(synthetic_phantoms.FINDINGS)
    assert results["checkpoint"] == str(run.resolve()) and results["metric"] == "auroc"
    (found,) = results["fractions"].values()
    assert list(results["fractions"]) == ["0.1"] and found["n_train"] >= 4
    assert 0.0 <= found["auroc"] <= 1.0 and 0 <= found["best_epoch"] < found["epochs"] <= 4


def test_errors_name_the_missing_checkpoint_or_dataset(run, tmp_path):
    config = _config("dataset=chexpert", tmp_path)
    with pytest.raises(downstream.DownstreamError, match="does not exist"):
        downstream.probe(config, tmp_path / "no-run")
    with pytest.raises(downstream.DownstreamError, match=f"checkpoint {tmp_path}.* does not exist"):
        finetune(finetune_config.get_config("dataset=cc_ccii"), tmp_path / "no-run", tmp_path)
    with pytest.raises(
        downstream.DownstreamError,
        match=f"chexpert/xray is not prepared in {tmp_path}.*prepare chexpert .*--manual_dir",
    ):
        downstream.probe(config, run)


# ------------------------------------------------------------------------------ fine-tuning

GREY = {"NCP": 220, "CP": 130, "Normal": 40}  # the toy signal: each class its own brightness


@pytest.fixture(scope="module")
def cc_ccii_dir(tmp_path_factory, run):
    """CC-CCII laid out as released, 6 patients a class, prepared at the run's volume size."""
    root = tmp_path_factory.mktemp("Clean-CC-CCII")
    for label, grey in GREY.items():
        for patient in range(6):
            for n in range(4):
                _image(root / label / f"{label}{patient}" / "1" / f"{n}.png", grey, (16, 16))
    data_dir = tmp_path_factory.mktemp("cc-ccii-data")
    shape = tuple(inference.load_config(run).model.volume_size)
    ensure_prepared("cc_ccii", data_dir, manual_dir=str(root), volume_shape=shape, num_workers=0)
    return data_dir


def test_finetune_learns_and_writes_eval_json(run, cc_ccii_dir, tmp_path):
    proc = _cli(
        "unimedi_jax.finetune",
        "--config=configs/finetune.py:dataset=cc_ccii",
        f"--config.data.data_dir={cc_ccii_dir}",
        # CC-CCII's grey PNGs are stored through gray_window (-1000, 1000): read them back
        # through it (docs/data.md), not the run's lung window.
        "--config.data.hu_window=(-1000.0,1000.0)",
        "--config.train.epochs=4",
        "--config.train.batch_size=4",
        "--config.train.warmup_epochs=1",
        "--config.train.learning_rate=1e-2",
        "--config.log_every_steps=2",
        f"--workdir={run}",
        f"--out={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ETA" in proc.stderr
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["kind"] == "finetune" and results["metric"] == "accuracy"
    assert results["classes"] == ["NCP", "CP", "Normal"] and results["step"] == 2
    losses = [epoch["train_loss"] for epoch in results["history"]]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert set(results["test"]) == {"accuracy", "auroc", "loss"}
    assert results["test"]["accuracy"] == 1.0  # three brightness levels, perfectly separable
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def _finetune_config(data_dir, epochs=2):
    config = finetune_config.get_config("dataset=cc_ccii")
    config.data.data_dir = str(data_dir)
    config.train.update(epochs=epochs, batch_size=4, warmup_epochs=1)
    config.log_every_steps = 1
    return config


def _with_batch_hook(monkeypatch, hook):
    """Fine-tuning reads its batches through ``finetune_epochs.labelled_epoch``;
    ``hook(step, batch)`` sees (and may change) each one before the trainer does."""
    original, step = finetune_epochs.labelled_epoch, [0]

    def hooked(*args, **kwargs):
        for batch in original(*args, **kwargs):
            step[0] += 1
            yield hook(step[0], batch)

    monkeypatch.setattr(finetune_epochs, "labelled_epoch", hooked)


def test_main_dispatches_a_finetune_config_to_the_finetuning_trainer(run, cc_ccii_dir, tmp_path):
    proc = _cli(
        "unimedi_jax.main",
        "--config=configs/finetune.py:dataset=cc_ccii",
        f"--config.data.data_dir={cc_ccii_dir}",
        "--config.train.epochs=1",
        "--config.train.batch_size=4",
        f"--workdir={run}",
        f"--out={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["kind"] == "finetune" and results["epochs"] == 1
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == {k: results[k] for k in ("dataset", "encoder", "best_epoch", "test")}
    assert json.loads((tmp_path / "config.json").read_text())["kind"] == "finetune"


@pytest.mark.parametrize(
    ("module", "arg", "out", "message"),
    [
        (finetune_config, "dataset=cc_ccii", None, "needs --out=DIR"),
        (pretrain_config, "tiny", "runs/x", "--out=runs/x is the new folder of a fine-tuning"),
        (probe_config, "dataset=cc_ccii", "runs/x", "python -m unimedi_jax.evaluate"),
    ],
)
def test_a_config_and_flags_that_make_no_job_are_refused_before_anything_runs(
    module, arg, out, message, tmp_path
):
    with pytest.raises(by_kind.TrainerUsageError, match=message):
        by_kind.run(module.get_config(arg), tmp_path / "w", out)
    assert not (tmp_path / "w").exists()


def test_main_reports_a_probe_config_as_a_usage_error(tmp_path):
    proc = _cli(
        "unimedi_jax.main",
        "--config=configs/probe.py:dataset=cc_ccii",
        f"--workdir={tmp_path}",
        f"--out={tmp_path}/w",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert "TrainerUsageError" in line and "python -m unimedi_jax.evaluate" in line


def test_finetune_stops_at_a_nan_naming_the_epoch_and_step(run, cc_ccii_dir, tmp_path, monkeypatch):
    def poison(step, batch):
        if step == 2:
            batch["volume"][0, 0, 0, 0] = np.nan
        return batch

    _with_batch_hook(monkeypatch, poison)
    expected = r"at epoch 1/2, step 2 \(grad_norm=nan, loss=nan\)\. Fine-tuning keeps no"
    with pytest.raises(NonFiniteLossError, match=expected):
        finetune(_finetune_config(cc_ccii_dir), run, tmp_path)
    assert not (tmp_path / "eval.json").exists()


def test_finetune_sigterm_stops_after_the_step_with_a_message(
    run, cc_ccii_dir, tmp_path, monkeypatch
):
    def preempt(step, batch):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    handler = signal.getsignal(signal.SIGTERM)
    _with_batch_hook(monkeypatch, preempt)
    with pytest.raises(Preempted, match="SIGTERM at epoch 1/2, step 2; it does not resume"):
        finetune(_finetune_config(cc_ccii_dir), run, tmp_path)
    assert signal.getsignal(signal.SIGTERM) is handler  # restored for the rest of the process
    assert not (tmp_path / "eval.json").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # no epoch finished
