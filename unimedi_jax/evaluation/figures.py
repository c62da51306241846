"""Figures of what a trained UniMedI attends to and how its shared space looks (Figs. 2, 5, 7).

The library of ``python -m unimedi_jax.visualize``; ``draw_figure`` is the command's whole job.
``slices``: CT volumes as strips of axial slices, the k slices picked by Eq. 2 framed, the score
curve under each strip and, where the data knows them (phantoms), the lesion slices marked.
``masking``: X-rays, the tokens the teacher's Eq. 1 attention keeps unmasked, the attention map.
``tsne``: a t-SNE of held-out X-ray, CT and report embeddings, by modality (marker) and finding
(colour). ``curves``: loss terms, learning rate and throughput of one or more runs, overlaid.
The figure functions take arrays and return a matplotlib Figure built without pyplot,
so they need no display and leave no global state behind.
"""

from __future__ import annotations

import functools
import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from data_pipelines.eval_split import eval_batches
from data_pipelines.sources import open_source, parse_sources
from unimedi_jax.core.errors import UserError
from unimedi_jax.core.paths import shown_path
from unimedi_jax.core.run_folders import check_output, written_atomically
from unimedi_jax.evaluation import trained_model
from unimedi_jax.evaluation.evaluators import build_eval_set
from unimedi_jax.method import selection
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.models.vit import token_grid
from unimedi_jax.train.loop import PHASES
from unimedi_jax.train.step import masking_of

SELECTED_COLOR = "gold"
LESION_COLOR = "red"
MASKED_COLOR = "#8fa3bf"  # masked patches: a flat blue-grey that no X-ray pixel shows
HEAT_CMAP = "jet"  # attention maps, scaled to each image's range
MODALITY_MARKERS = {"X-ray (2D)": "o", "CT (3D)": "s", "X-ray report": "^", "CT report": "v"}
DEFAULT_NUM = {"slices": 3, "masking": 4, "tsne": 200}


# ------------------------------------------------------------------------------------ t-SNE


def tsne(x: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE of x [N, F]: scikit-learn's Barnes-Hut (O(N log N), so thousands of points
    take seconds), PCA start and a fixed seed, so the layout is deterministic."""
    from sklearn.manifold import TSNE

    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    embedded = TSNE(
        n_components=2,
        perplexity=min(perplexity, (n - 1) / 3.0),
        init="pca",
        random_state=seed,
        method="barnes_hut",
    ).fit_transform(x)
    return embedded - embedded.mean(axis=0)


# ------------------------------------------------------------------------------ figure parts


def _report_axis(ax, report: str, width: int) -> None:
    ax.axis("off")
    ax.text(0.0, 1.0, textwrap.fill(report, width), va="top", ha="left", fontsize=9, wrap=True)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True values."""
    padded = np.concatenate([[False], flags.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _span_text(flags: np.ndarray) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in _runs(flags)) or "none"


def _slice_strip(ax, volume: np.ndarray, picked: np.ndarray, lesion: np.ndarray | None) -> None:
    """Slices side by side, slice i over x in [i - 0.5, i + 0.5] so the score plot lines up."""
    depth, height, width = volume.shape
    top = height / width
    montage = np.concatenate(list(volume), axis=1)
    ax.imshow(montage, cmap="gray", vmin=0.0, vmax=1.0, extent=(-0.5, depth - 0.5, 0.0, top))
    for i in picked:
        frame = (i - 0.47, 0.02 * top), 0.94, 0.96 * top
        ax.add_patch(Rectangle(*frame, fill=False, lw=2.5, edgecolor=SELECTED_COLOR))
    if lesion is not None and lesion.any():
        rows = np.flatnonzero(lesion)
        ax.plot(rows, np.full(len(rows), -0.12 * top), "^", color=LESION_COLOR, ms=6)
    ax.set_ylim(-0.22 * top, top)
    ax.set_xlim(-0.5, depth - 0.5)
    ax.axis("off")


def _score_plot(ax, scores: np.ndarray, picked: np.ndarray, lesion: np.ndarray | None) -> None:
    depth = len(scores)
    slices = np.arange(depth)
    if lesion is not None:
        for first, last in _runs(lesion):
            ax.axvspan(first - 0.5, last + 0.5, color=LESION_COLOR, alpha=0.15, lw=0)
    ax.plot(slices, scores, "-o", color="tab:blue", ms=3, lw=1.2)
    ax.plot(picked, scores[picked], "o", ms=8, mfc=SELECTED_COLOR, mec="black")
    ax.set_xlim(-0.5, depth - 0.5)
    ax.margins(y=0.15)
    ax.set_xticks(slices[:: max(1, depth // 16)])
    ax.set_xlabel("slice", fontsize=8)
    ax.set_ylabel("[CLS] attention\nto the slice", fontsize=8)
    ax.tick_params(labelsize=7)


def _slice_legend(fig: Figure, with_lesion: bool) -> None:
    handles = [
        Line2D(
            [], [], color="tab:blue", marker="o", ms=3, label="mean [CLS] attention of its tokens"
        ),
        Patch(facecolor="none", edgecolor=SELECTED_COLOR, lw=2.5, label="selected slice"),
    ]
    if with_lesion:
        handles += [
            Line2D([], [], ls="", marker="^", color=LESION_COLOR, label="lesion slice"),
            Patch(color=LESION_COLOR, alpha=0.15, label="lesion slices (ground truth)"),
        ]
    fig.legend(
        handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9, frameon=False
    )


# ------------------------------------------------------------------------------- the figures


def slices_figure(
    volumes: np.ndarray,
    indices: np.ndarray,
    scores: np.ndarray,
    reports: Sequence[str],
    lesion_slices: np.ndarray | None = None,
) -> Figure:
    """Fig. 5 (right): per volume a slice strip (selected framed), its Eq. 2 scores, its report.

    volumes [N, D, H, W] in [0, 1]; indices [N, k] and scores [N, D] from ``select_slices``;
    lesion_slices bool [N, D] (phantoms) shades the ground truth. Three axes per volume.
    """
    count, depth = volumes.shape[:2]
    fig = Figure(figsize=(max(10.0, 0.7 * depth), 3.6 * count), layout="constrained")
    grid = fig.add_gridspec(3 * count, 1, height_ratios=[1.0, 1.0, 0.55] * count)
    for n in range(count):
        lesion = None if lesion_slices is None else np.asarray(lesion_slices[n], bool)
        picked = np.asarray(indices[n])
        strip = fig.add_subplot(grid[3 * n])
        _slice_strip(strip, volumes[n], picked, lesion)
        title = f"CT {n}: selected slices {', '.join(map(str, picked))}"
        if lesion is not None:
            title += f"; lesion slices {_span_text(lesion)}"
        strip.set_title(title, fontsize=10, loc="left")
        _score_plot(fig.add_subplot(grid[3 * n + 1]), np.asarray(scores[n]), picked, lesion)
        _report_axis(fig.add_subplot(grid[3 * n + 2]), reports[n], int(14 * fig.get_figwidth()))
    _slice_legend(fig, lesion_slices is not None)
    return fig


def _patch_pixels(token_values: np.ndarray, grid: tuple[int, int], shape: tuple[int, int]):
    """Per-token values [gh * gw] spread over the pixels [H, W] of their patches."""
    gh, gw = grid
    ph, pw = shape[0] // gh, shape[1] // gw
    return np.kron(np.asarray(token_values).reshape(gh, gw), np.ones((ph, pw)))


def _heat(token_values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """RGBA [gh, gw] attention map, more opaque where attention is high so the anatomy shows."""
    values = np.asarray(token_values, np.float64).reshape(grid)
    scaled = (values - values.min()) / max(float(np.ptp(values)), 1e-12)
    rgba = matplotlib.colormaps[HEAT_CMAP](scaled)
    rgba[..., 3] = 0.7 * scaled
    return rgba


def _pixel_extent(shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """imshow extent of an [H, W] image drawn at its pixel coordinates."""
    return (-0.5, shape[1] - 0.5, shape[0] - 0.5, -0.5)


def masking_figure(
    images: np.ndarray,
    attention: np.ndarray,
    grid: tuple[int, int],
    ratio: float,
    reports: Sequence[str],
) -> Figure:
    """Fig. 5 (left): per X-ray the image, the tokens masking keeps, the attention, the report;
    a colour bar for the attention, a key for the masked patches.

    images [N, H, W] in [0, 1]; attention [N, gh * gw] is the EMA teacher's Eq. 1 over the
    patch tokens (what masking uses). Masked
    patches (``selection.attentive_token_mask``) are NaN in the kept-token panel, drawn in a flat
    colour. Four axes per image.
    """
    masks = np.asarray(selection.attentive_token_mask(jnp.asarray(attention), ratio))
    masked_cmap = matplotlib.colormaps["gray"].with_extremes(bad=MASKED_COLOR)
    fig = Figure(figsize=(13.0, 3.2 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), 4, width_ratios=[1, 1, 1, 1.6], squeeze=False)
    for n, (image, row) in enumerate(zip(images, axes, strict=True)):
        hidden = _patch_pixels(masks[n], grid, image.shape) > 0.5
        row[0].imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        row[0].set_title(f"X-ray {n}", fontsize=10)
        row[1].imshow(np.where(hidden, np.nan, image), cmap=masked_cmap, vmin=0.0, vmax=1.0)
        kept = f"{int((~masks[n]).sum())}/{masks.shape[1]}"
        row[1].set_title(f"kept {kept} tokens (ratio {ratio:g})", fontsize=10)
        row[2].imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        row[2].imshow(_heat(attention[n], grid), extent=_pixel_extent(image.shape))
        row[2].set_title("EMA teacher's [CLS] attention", fontsize=10)
        for ax in row[:3]:
            ax.set_xticks([])
            ax.set_yticks([])
        _report_axis(row[3], reports[n], 60)
    scale = ScalarMappable(Normalize(0.0, 1.0), HEAT_CMAP)
    bar = fig.colorbar(scale, ax=axes[:, 2], shrink=0.8, ticks=[0.0, 1.0])
    bar.ax.set_yticklabels(["lowest", "highest"])
    bar.set_label("attention (Eq. 1), within each X-ray", fontsize=9)
    masked = Patch(facecolor=MASKED_COLOR, label="masked patch (hidden from the student)")
    fig.legend(handles=[masked], loc="outside upper center", fontsize=9, frameon=False)
    return fig


def finding_classes(labels: np.ndarray, names: Sequence[str]) -> list[str]:
    """One class per sample for colouring: its first positive finding, 'normal' when none."""
    if not len(names):
        return ["unlabelled"] * len(labels)
    positive = np.nan_to_num(np.asarray(labels, np.float64)) == 1.0
    return [names[int(np.argmax(row))] if row.any() else "normal" for row in positive]


def _finding_colours(classes: Sequence[Sequence[str]]) -> dict[str, tuple]:
    """One colour per finding class across panels, 'normal' first."""
    names = sorted({c for group in classes for c in group}, key=lambda c: (c != "normal", c))
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"].colors
    return {c: palette[i % len(palette)] for i, c in enumerate(names)}


def _tsne_panel(
    ax,
    embeddings: Mapping[str, np.ndarray],
    classes: Mapping[str, Sequence[str]],
    colour: Mapping[str, tuple],
    perplexity: float,
) -> dict[str, str]:
    """Draws one t-SNE of all groups on ``ax``; returns each group's marker."""
    groups = list(embeddings)
    points = tsne(np.concatenate([embeddings[g] for g in groups]), perplexity)
    spare_markers = iter("DPX*phd")
    start, marker_of = 0, {}
    for group in groups:
        stop = start + len(embeddings[group])
        marker_of[group] = MODALITY_MARKERS.get(group) or next(spare_markers)
        ax.scatter(
            *points[start:stop].T,
            c=[colour[c] for c in classes[group]],
            marker=marker_of[group],
            s=28,
            alpha=0.75,
            edgecolors="black",
            linewidths=0.3,
        )
        start = stop
    ax.set_xticks([])
    ax.set_yticks([])
    return marker_of


def _finding_legend(ax, colour: Mapping[str, tuple], anchor_y: float) -> None:
    ax.legend(
        handles=[Patch(color=c, label=name.replace("_", " ")) for name, c in colour.items()],
        title="finding",
        loc="upper left",
        bbox_to_anchor=(1.01, anchor_y),
        fontsize=9,
    )


def tsne_figure(
    embeddings: Mapping[str, np.ndarray],
    classes: Mapping[str, Sequence[str]],
    perplexity: float = 30.0,
) -> Figure:
    """Figs. 2 / 7: one t-SNE of all groups; marker = group (modality), colour = finding class.

    embeddings: group name -> [n, E] (names from ``MODALITY_MARKERS`` get their markers);
    classes: group name -> n class names. One axis, with a modality and a finding legend.
    """
    colour = _finding_colours(list(classes.values()))
    fig = Figure(figsize=(9.0, 7.0), layout="constrained")
    ax = fig.add_subplot()
    marker_of = _tsne_panel(ax, embeddings, classes, colour, perplexity)
    modality_legend = ax.legend(
        handles=[
            Line2D(
                [], [], ls="", marker=marker_of[g], color="0.3", label=f"{g} ({len(embeddings[g])})"
            )
            for g in embeddings
        ],
        title="modality",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=9,
    )
    ax.add_artist(modality_legend)
    _finding_legend(ax, colour, 0.55)
    ax.set_title("t-SNE of the shared embedding space (held-out set)", fontsize=11)
    return fig


def tsne_side_by_side(
    panels: Mapping[str, tuple[Mapping[str, np.ndarray], Mapping[str, Sequence[str]]]],
    perplexity: float = 30.0,
) -> Figure:
    """Fig. 2 as a comparison: one t-SNE per model (panel title -> (embeddings, classes) as
    ``tsne_figure`` takes them), side by side with one colour per finding across all panels,
    so the same finding can be followed from model to model."""
    colour = _finding_colours([c for _, classes in panels.values() for c in classes.values()])
    fig = Figure(figsize=(5.0 * len(panels) + 2.0, 5.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    markers = {}
    for ax, (title, (embeddings, classes)) in zip(axes, panels.items(), strict=True):
        markers.update(_tsne_panel(ax, embeddings, classes, colour, perplexity))
        ax.set_title(title, fontsize=10)
    fig.legend(
        handles=[Line2D([], [], ls="", marker=m, color="0.3", label=g) for g, m in markers.items()],
        loc="outside lower center",
        ncol=len(markers),
        fontsize=9,
    )
    _finding_legend(axes[-1], colour, 1.0)
    return fig


# ------------------------------------------------------------------------- from a trained run


@functools.partial(jax.jit, static_argnames="model")
def _attention(model: UniMedI, params, images):
    return model.apply({"params": params}, images, method=UniMedI.encode_vision).cls_attention


def image_attention(model: trained_model.UniMedIInference, images: np.ndarray) -> np.ndarray:
    """The teacher's Eq. 1 attention [N, P] on full (unmasked) X-rays, as masking uses it."""
    return np.asarray(_attention(model.model, model.teacher, trained_model.as_float(images)))


def _source(config: ml_collections.ConfigDict, modality: str) -> str:
    entries = parse_sources(config.data[f"sources_{modality}"])
    if not entries:
        raise ValueError(f"config.data.sources_{modality} is empty: this run has no such data")
    return entries[0][0]


def held_out(
    config: ml_collections.ConfigDict, modality: str, split: str, num: int, pool: int = 64
) -> dict:
    """``num`` held-out records of the run's first source, those with a finding first.

    Abnormal cases are what these figures are about (as in the paper's Fig. 5), so the first
    ``max(pool, num)`` records are read and stably reordered, abnormal before normal.
    """
    name = _source(config, modality)
    batch = next(eval_batches(config, name, modality, split, batch_size=max(pool, num)))
    abnormal = (np.nan_to_num(batch["labels"]) == 1.0).any(axis=1)
    order = np.argsort(~abnormal, kind="stable")[:num]
    return {
        k: np.asarray(v)[order] if isinstance(v, np.ndarray) else [v[i] for i in order]
        for k, v in batch.items()
    }


def label_names(config: ml_collections.ConfigDict, modality: str, split: str) -> list[str]:
    """The label vocabulary a prepared source records (phantoms: 'findings', others 'labels')."""
    path = open_source(_source(config, modality), config.data.data_dir, modality, split).path
    metadata = tfds.builder_from_directory(path).info.metadata or {}
    return list(metadata.get("findings") or metadata.get("labels") or [])


def run_slices(model: trained_model.UniMedIInference, split: str, num: int) -> Figure:
    """The slice-selection figure of ``num`` held-out volumes of a run."""
    batch = held_out(model.config, "3d", split, num)
    indices, scores = model.select_slices(batch["volume"])
    return slices_figure(
        batch["volume"], indices, scores, batch["report"], batch.get("lesion_slices")
    )


def run_masking(model: trained_model.UniMedIInference, split: str, num: int) -> Figure:
    """The masking figure of ``num`` held-out X-rays, with the run's mask ratio of X-rays."""
    config = model.config
    batch = held_out(config, "2d", split, num)
    grid = token_grid(config.model.image_size, config.model.patch_2d)
    attention = image_attention(model, batch["image"])
    ratio, _ = masking_of(config.masking, "image")
    return masking_figure(batch["image"], attention, grid, ratio, batch["report"])


def run_tsne(model: trained_model.UniMedIInference, split: str, num: int) -> Figure:
    """The t-SNE of up to ``num`` held-out records per modality and their reports."""
    config = model.config
    data = build_eval_set(model, config, split, num).modalities
    present = [m for m in (("image", "2d", "X-ray"), ("volume", "3d", "CT")) if m[0] in data]
    found = {
        key: finding_classes(data[key].labels, label_names(config, modality, split))
        for key, modality, _ in present
    }
    groups = [(f"{name} ({modality.upper()})", key, "image_emb") for key, modality, name in present]
    groups += [(f"{name} report", key, "text_emb") for key, _, name in present]
    embeddings = {group: getattr(data[key], field) for group, key, field in groups}
    return tsne_figure(embeddings, {group: found[key] for group, key, _ in groups})


# ----------------------------------------------------------------------------- training curves


class CurvesError(UserError):
    """A folder that holds no training log to plot."""


CURVES = (  # (metrics.jsonl key, panel title)
    ("loss", "loss"),
    ("loss_vl", "L_vl (CLIP)"),
    ("loss_icl", "L_icl (DINO [CLS])"),
    ("loss_pcl", "L_pcl (iBOT patches)"),
    ("learning_rate", "learning rate"),
    ("samples_per_sec", "samples / s"),
)


def _metrics_rows(workdir: str | Path) -> list[dict[str, float]]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise CurvesError(
            f"{workdir} has no metrics.jsonl: pass a training run's --workdir (the folder "
            "python -m unimedi_jax.main wrote)"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_training_log(workdir: str | Path) -> list[dict[str, float]]:
    """The logged training steps of a run's metrics.jsonl (evaluation lines left out)."""
    return [row for row in _metrics_rows(workdir) if "loss" in row]


def read_phases(workdir: str | Path) -> dict[str, int]:
    """Phase name (``loop.PHASES``) -> the step the run's schedule entered it."""
    return {
        PHASES[key]: int(row[key]) for row in _metrics_rows(workdir) for key in row if key in PHASES
    }


def _mark_phases(ax, phases: Mapping[str, int], last_step: int, colour, run: str) -> None:
    """A dashed line where each phase starts; the unmasked tuning shaded to the last step."""
    for phase, step in phases.items():
        label = f"{phase} from step {step}{f' ({run})' if run else ''}"
        style = ":" if phase == PHASES["phase/unmasked_tuning"] else "--"
        ax.axvline(step, color=colour, linestyle=style, linewidth=1, label=label)
        if phase == PHASES["phase/unmasked_tuning"]:
            ax.axvspan(step, max(step, last_step), color=colour, alpha=0.08)


def curves_figure(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    phases: Mapping[str, Mapping[str, int]] | None = None,
) -> Figure:
    """The loss terms, learning rate and throughput over steps, one line per run (overlaid),
    with where each run's schedule entered a new phase (``phases``: run -> ``read_phases``)."""
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for name, rows in runs.items():
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                steps, values = zip(*points, strict=True)
                (line,) = ax.plot(steps, values, label=name, linewidth=1.2)
                run = name if len(runs) > 1 else ""
                marks = (phases or {}).get(name, {})
                _mark_phases(ax, marks, steps[-1], line.get_color(), run)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axes[0].legend(fontsize=8)
    return fig


def draw_curves(workdirs: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Writes the training curves of ``workdirs`` (overlaid, named by folder) as PNG ``out``,
    a file outside every run that appears only when complete; returns ``out``."""
    for workdir in workdirs:
        check_output(out, workdir, overwrite, is_dir=False)
    runs = {shown_path(str(workdir)): read_training_log(workdir) for workdir in workdirs}
    phases = {shown_path(str(workdir)): read_phases(workdir) for workdir in workdirs}
    with written_atomically(out, is_dir=False) as partial:
        curves_figure(runs, phases).savefig(partial, dpi=110)
    return Path(out)


FIGURES = {"slices": run_slices, "masking": run_masking, "tsne": run_tsne}


def draw_figure(
    figure: str,
    workdir: str | Path,
    out: str | Path,
    num: int | None = None,
    split: str = "test",
    overwrite: bool = False,
) -> Path:
    """Loads a run, draws one of ``FIGURES`` from ``num`` held-out records (default
    ``DEFAULT_NUM``) of ``split`` and writes it as PNG to ``out``, a file outside the run that
    appears only when complete; returns ``out``. The title (also the PNG's Title) names the run,
    its step and the split."""
    num = num or DEFAULT_NUM[figure]
    check_output(out, trained_model.resolve_run(workdir)[0], overwrite, is_dir=False)
    model = trained_model.load(workdir)
    drawn = FIGURES[figure](model, split, num)
    title = f"{shown_path(str(workdir))}, step {model.step}, {split} split"
    drawn.suptitle(title, fontsize=11)
    with written_atomically(out, is_dir=False) as partial:
        drawn.savefig(partial, dpi=110, metadata={"Title": title})
    return Path(out)
