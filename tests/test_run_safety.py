"""Commands never destroy the run they read, and a damaged newest checkpoint falls back to the
previous one: export/visualize outputs outside the run and written whole, run kinds refused,
read-only commands creating nothing, restore skipping checkpoints whose arrays were cut short."""

import json
import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from configs import finetune as finetune_config
from tests.tiny_runs import tiny_run_config
from unimedi_jax import inference
from unimedi_jax.core import run_folders
from unimedi_jax.core.errors import user_error_types
from unimedi_jax.evaluation.figures import draw_figure
from unimedi_jax.interop.torch_export import export_run
from unimedi_jax.train.checkpoint import Checkpointer, CheckpointReadError
from unimedi_jax.trainers.finetuning import finetune
from unimedi_jax.trainers.pretraining import train


def _config(data_dir: Path):
    return tiny_run_config(data_dir, total_steps=4, checkpoint_every_steps=2, log_every_steps=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints 2 and 4 and a metrics line per step; tests work on copies."""
    root = tmp_path_factory.mktemp("trained")
    train(_config(root / "data"), root / "run")
    return root


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained / "run", copy)
    return copy


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    } | {str(p.relative_to(folder)) + "/": b"" for p in folder.rglob("*") if p.is_dir()}


def damage(run: Path, step: int) -> None:
    """Cuts every array file of the checkpoint of ``step`` to half its length (full disk,
    interrupted copy): the checkpoint still looks complete to orbax."""
    files = [p for p in (run / "checkpoints" / str(step)).rglob("*") if p.parent.name == "d"]
    assert files
    for path in files:
        os.truncate(path, path.stat().st_size // 2)


def _user_error(fn, *args, **kwargs) -> str:
    """``Class: message`` of the user error ``fn`` raises: what its command reports (one
    paragraph, exit 2; tests/test_user_errors.py runs the commands)."""
    with pytest.raises(user_error_types()) as caught:
        fn(*args, **kwargs)
    return f"{type(caught.value).__name__}: {caught.value}"


# ------------------------------------------------------------------- export and visualize --out


@pytest.mark.parametrize("inside", ["", "export/timm"])
def test_export_refuses_an_out_in_the_run(run, inside):
    before = _tree(run)
    out = run / inside if inside else run
    message = _user_error(export_run, run, "timm", out, overwrite=True)
    assert f"--out={out}" in message and "outside" in message
    assert _tree(run) == before  # config.json not replaced, nothing created


def test_export_out_exists_needs_overwrite_and_is_replaced_whole(run, tmp_path):
    out = tmp_path / "exports" / "timm"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert "pass --overwrite" in _user_error(export_run, run, "timm", out)
    assert (out / "notes.txt").read_text() == "mine"

    export_run(run, "timm", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert [p.name for p in out.parent.iterdir()] == ["timm"]  # no temporary sibling left
    state = Checkpointer(run / "checkpoints", keep=3).restore_raw(4)
    cls = safetensors.numpy.load_file(out / "model.safetensors")["cls_token"]
    np.testing.assert_array_equal(  # the run's vision_weights: the student's
        cls.ravel(), np.asarray(state["params"]["vision"]["cls_token"]).ravel()
    )


def test_export_that_fails_leaves_no_out(run, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    out = tmp_path / "exports" / "monai"
    with pytest.raises(OSError, match="No space left"):
        export_run(run, "monai", out)
    assert list(out.parent.iterdir()) == []


def test_export_refuses_to_overwrite_a_run(run, trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    before = _tree(other)
    assert "holds a pre-training run" in _user_error(export_run, run, "timm", other, overwrite=True)
    assert _tree(other) == before


def test_visualize_out_rules(run, tmp_path):
    before = _tree(run)
    inside = run / "masking.png"
    assert "inside the folder of the run" in _user_error(draw_figure, "masking", run, inside, 1)
    assert _tree(run) == before
    out = tmp_path / "masking.png"
    out.write_bytes(b"old figure")
    assert "pass --overwrite" in _user_error(draw_figure, "masking", run, out, 1)
    assert out.read_bytes() == b"old figure"
    draw_figure("masking", run, out, 1, overwrite=True)
    assert out.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masking.png", "run"]
    assert _tree(run) == before


# --------------------------------------------------------------------------------- run kinds


def test_finetune_refuses_a_pretraining_run_before_writing(run):
    (run / "eval.json").write_text('{"retrieval": 0.5}\n')
    before = _tree(run)
    config = finetune_config.get_config("dataset=phantoms/ct")
    with pytest.raises(run_folders.RunFolderError, match=r"holds a pre-training run"):
        finetune(config, run, run)
    assert _tree(run) == before  # metrics.jsonl and eval.json kept


@pytest.mark.parametrize("kind", ["export", "finetune"])
def test_training_refuses_a_folder_of_another_kind(trained, tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "export":
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "config.json").write_text('{"architecture": "vit_base_patch16_224"}')
    else:  # a fine-tuning folder written before the kind was recorded in config.json
        (folder / "eval.json").write_text('{"kind": "finetune", "test": {}}')
        (folder / "metrics.jsonl").write_text('{"step": 1, "train_loss": 0.5}\n')
    before = _tree(folder)
    with pytest.raises(run_folders.RunFolderError, match=f"holds {run_folders.describe(kind)}"):
        train(_config(trained / "data"), folder)
    assert _tree(folder) == before


def test_a_run_without_the_kind_field_is_recognised(run):
    config = json.loads((run / "config.json").read_text())
    assert config.pop("kind") == "pretrain"
    (run / "config.json").write_text(json.dumps(config))
    assert run_folders.run_kind(run) == run_folders.PRETRAIN
    assert inference.resolve_run(run / "checkpoints" / "2") == (run, 2)
    with pytest.raises(run_folders.RunFolderError, match="holds a pre-training run"):
        finetune(finetune_config.get_config("dataset=phantoms/ct"), run, run)


def test_readers_refuse_an_export_folder_and_create_nothing(run, tmp_path):
    out = tmp_path / "timm"
    export_run(run, "timm", out)
    before = _tree(out)
    with pytest.raises(inference.RunNotFoundError, match="holds a PyTorch export"):
        inference.load(out)
    message = _user_error(export_run, out, "timm", "x")
    assert "holds a PyTorch export" in message
    assert _tree(out) == before and not Path("x").exists()


def test_read_only_commands_create_nothing_in_the_run(run, tmp_path):
    before = _tree(run)
    assert inference.load(run).step == 4
    export_run(run, "hf_bert", tmp_path / "bert")
    assert _tree(run) == before
    shutil.rmtree(run / "checkpoints")
    before = _tree(run)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        inference.load(run)
    assert _tree(run) == before  # no empty checkpoints/ made


# ------------------------------------------------------------------- damaged newest checkpoint


def _params(workdir: Path, step: int) -> dict:
    return Checkpointer(workdir / "checkpoints", keep=3).restore_raw(step)["params"]


def test_readers_fall_back_to_the_previous_checkpoint(run, trained, tmp_path, caplog):
    damage(run, 4)
    before = _tree(run)
    with caplog.at_level(logging.WARNING):
        model = inference.load(run)
    assert model.step == 2
    (line,) = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert "step 4" in line and "OUT_OF_RANGE" in line
    jax.tree.map(np.testing.assert_array_equal, model.student, _params(trained / "run", 2))
    export_run(run, "monai", tmp_path / "monai")
    assert (tmp_path / "monai" / "model.safetensors").is_file()
    assert _tree(run) == before  # the damaged checkpoint is kept as it was

    with pytest.raises(CheckpointReadError, match=r"checkpoint step 4 .*could not be read"):
        inference.load(run / "checkpoints" / "4")
    damage(run, 2)
    message = _user_error(export_run, run, "monai", tmp_path / "none")
    assert "CheckpointReadError: no checkpoint in" in message
    assert "step 4: ValueError: OUT_OF_RANGE" in message
    assert "step 2: ValueError: OUT_OF_RANGE" in message
    assert _tree(run).keys() == before.keys()  # both kept, nothing created


def _losses(workdir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "samples_per_sec"} for line in lines]


def test_resume_skips_a_damaged_newest_checkpoint_exactly(run, trained, caplog):
    damage(run, 4)
    with caplog.at_level(logging.WARNING):
        train(_config(trained / "data"), run)
    assert any(
        "step 4" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    original = trained / "run"
    assert _losses(run) == _losses(original)  # steps 3-4 redone from step 2, logged once
    jax.tree.map(np.testing.assert_array_equal, _params(run, 4), _params(original, 4))
    (moved,) = (run / "damaged-checkpoints").iterdir()
    assert moved.name.startswith("4-") and (moved / "state").is_dir()
