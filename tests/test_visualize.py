"""Figures from a tiny trained run, the PNGs the command writes, and the t-SNE against known
clusters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs.pretrain import get_config
from data_pipelines.prepare import ensure_prepared
from unimedi_jax import inference
from unimedi_jax.evaluation import figures
from unimedi_jax.trainers.pretraining import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = get_config("tiny")
    config.total_steps = 2
    config.data.data_dir = str(workdir / "data")
    # Fewer phantoms than the demo builds: the figures need only a few held-out records.
    ensure_prepared(
        "phantoms",
        config.data.data_dir,
        image_size=config.model.image_size[0],
        volume_shape=tuple(config.model.volume_size),
        num_train=64,
        num_validation=0,
        num_test=32,
    )
    train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def model(run):
    return inference.load(run)


def test_tsne_keeps_separated_clusters_apart():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 20)) * 8.0
    x = np.concatenate([c + rng.normal(size=(40, 20)) for c in centres])
    labels = np.repeat(np.arange(5), 40)
    y = figures.tsne(x)
    assert y.shape == (200, 2) and np.isfinite(y).all()
    distances = np.sum((y[:, None] - y[None]) ** 2, axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert np.mean(labels[distances.argmin(axis=1)] == labels) > 0.9


def test_finding_classes_takes_the_first_positive_or_normal():
    labels = np.array([[0, 1, 1], [0, 0, 0], [np.nan, -1, 1]])
    assert figures.finding_classes(labels, ["a", "b", "c"]) == ["b", "normal", "c"]
    assert figures.finding_classes(labels, []) == ["unlabelled"] * 3


def test_slices_figure_has_strip_scores_and_report_per_volume(model):
    fig = figures.run_slices(model, "test", 2)
    assert len(fig.axes) == 3 * 2
    strip = fig.axes[0]
    k = model.config.selection.k
    assert len(strip.patches) == k  # one frame per selected slice
    assert "lesion slices" in strip.get_title(loc="left")  # phantoms know their lesions


def test_masking_panel_keeps_the_highest_attention_tokens(model):
    config = model.config
    fig = figures.run_masking(model, "test", 3)
    assert len(fig.axes) == 4 * 3 + 1  # and the attention's colour bar
    batch = figures.held_out(config, "2d", "test", 3)
    attention = figures.image_attention(model, batch["image"])
    gh, gw = (s // p for s, p in zip(config.model.image_size, config.model.patch_2d, strict=True))
    tokens = gh * gw
    for n in range(3):
        panel = np.ma.filled(fig.axes[4 * n + 1].images[0].get_array().astype(float), np.nan)
        ph, pw = panel.shape[0] // gh, panel.shape[1] // gw
        visible = np.isfinite(panel).reshape(gh, ph, gw, pw).any(axis=(1, 3)).reshape(-1)
        assert visible.sum() == round((1 - config.masking.ratio) * tokens)
        assert attention[n][visible].min() >= attention[n][~visible].max()


def test_tsne_figure_plots_every_group(model):
    fig = figures.run_tsne(model, "test", 12)
    (ax,) = fig.axes
    assert len(ax.collections) == 4  # X-ray, CT and the reports of each
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4 * 12


@pytest.mark.parametrize("figure", ["slices", "masking", "tsne"])
def test_draw_figure_writes_a_png(run, tmp_path, figure):
    out = tmp_path / f"{figure}.png"
    assert figures.draw_figure(figure, run, out, num=8) == out
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0


def test_tsne_is_deterministic():
    x = np.random.default_rng(1).normal(size=(60, 8))
    np.testing.assert_array_equal(figures.tsne(x), figures.tsne(x))


def _write_log(folder, rows):
    folder.mkdir(parents=True)
    lines = [json.dumps(row) for row in rows]
    lines.insert(1, json.dumps({"step": rows[0]["step"], "retrieval/R@1": 0.5}))  # an eval line
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _log(seed, steps):
    rng = np.random.default_rng(seed)
    keys = [key for key, _ in figures.CURVES]
    return [{"step": s, **{k: float(rng.uniform(0, 10)) for k in keys}} for s in steps]


def test_curves_overlay_every_run_with_the_logged_values(tmp_path):
    logs = {"a": _log(0, [10, 20, 30]), "b": _log(1, [10, 20])}
    for name, rows in logs.items():
        _write_log(tmp_path / name, rows)
    runs = {name: figures.read_training_log(tmp_path / name) for name in logs}
    fig = figures.curves_figure(runs)
    for ax, (key, _) in zip(fig.axes, figures.CURVES, strict=False):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["a", "b"]
        for line, rows in zip(lines, logs.values(), strict=True):
            assert list(line.get_xdata()) == [row["step"] for row in rows]
            assert list(line.get_ydata()) == [row[key] for row in rows]


def test_visualize_curves_command(tmp_path):
    # The README line, on two logged runs overlaid; a folder without a log is a user error.
    for name, seed in (("demo", 0), ("other", 1)):
        _write_log(tmp_path / "runs" / name, _log(seed, [20, 40]))
    command = [sys.executable, "-m", "unimedi_jax.visualize", "curves"]
    done = subprocess.run(
        [*command, "--workdir=runs/demo", "runs/other", "--out=curves.png"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG"
    (tmp_path / "empty").mkdir()
    missing = subprocess.run(
        [*command, f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'c.png'}"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "CurvesError" in missing.stderr
