"""Figures from a tiny trained run, the PNGs the command writes, and the t-SNE against known
clusters."""

import numpy as np
import pytest
from PIL import Image

from configs.pretrain import get_config
from data_pipelines.prepare import ensure_prepared
from unimedi_jax import inference
from unimedi_jax.evaluation import figures
from unimedi_jax.train.pretraining import train


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
    assert len(fig.axes) == 4 * 3
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
