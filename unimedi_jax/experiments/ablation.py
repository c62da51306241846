"""The paper's comparisons on phantoms: Figs. 2/7 and 6 (does one model with UniMedI's designs
bring X-rays and CTs of the same finding together?) and Table 7 (what self-distillation,
attentive slice selection and attentive masking add).

Every row is a set of config overrides of one preset (``ROWS``), trained at one budget for each
seed by the pre-training trainer in ``<out>/runs/<row>[-<part>]/seed<S>`` and evaluated on the
held-out split by the configured evaluators (``evaluators.py``). A run's figures and held-out
embeddings are written next to its checkpoints when it is done, so a rerun skips it (and an
interrupted run resumes from its checkpoints). The shared-space figures (cross-modal mAP, 2D-3D
distance) are computed per row from those embeddings, which is what lets row (a), two separate
models, be scored at all. The library of ``python -m unimedi_jax.ablate``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from unimedi_jax.core.errors import UserError
from unimedi_jax.core.run_folders import written_atomically
from unimedi_jax.evaluation import evaluators, figures, trained_model
from unimedi_jax.trainers import by_kind
from unimedi_jax.trainers.pretraining import prepare_demo_data

SHARED_SPACE = ("cross_modal", "modality_distance")  # computed per row, from the embeddings
RUN_RESULTS = "ablation_eval.json"  # in a run's workdir: its figures, written when it is done
RUN_EMBEDDINGS = "ablation_embeddings.npz"  # its held-out embeddings, labels and finding names


class AblationError(UserError):
    """An ablation asked for that cannot run as given (unknown rows, a folder of another
    budget)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the comparisons: its label and each model's overrides of the preset (one model:
    part ''; row (a): an X-ray-only and a CT-only part)."""

    label: str
    parts: Mapping[str, Mapping[str, Any]]
    note: str = ""


ROWS: dict[str, Row] = {
    "separate": Row(
        "(a) separate models, X-ray-only + CT-only",
        {"xray": {"data.sources_3d": ""}, "ct": {"data.sources_2d": ""}},
        "two models that share no space: its cross-modal figures compare the X-ray model's "
        "X-ray embeddings with the CT model's CT embeddings",
    ),
    "vl": Row(
        "(b) VL: one model, CLIP only, random slices",
        {"": {"loss.self_distill": False, "selection.mode": "random"}},
    ),
    "vl_sd": Row("VL+SD: + self-distillation, random slices", {"": {"selection.mode": "random"}}),
    "unimedi": Row("(c) VL+SD+Attn: UniMedI (the preset)", {"": {}}),
    "random_masking": Row(
        "VL+SD+Attn, random masking", {"": {"masking.mode": "random"}}, "masking.mode=random"
    ),
    # Beyond the paper: what masking costs the X-rays (CTs keep the preset's masking).
    "xray_unmasked": Row(
        "VL+SD+Attn, X-rays unmasked, L_pcl on CTs only",
        {"": {"masking.image_ratio": 0.0, "loss.pcl_modalities": ("volume",)}},
        "masking.image_ratio=0 loss.pcl_modalities=volume",
    ),
    "xray_mask_quarter": Row(
        "VL+SD+Attn, X-rays masked 25%",
        {"": {"masking.image_ratio": 0.25}},
        "masking.image_ratio=0.25",
    ),
    "xray_random_masking": Row(
        "VL+SD+Attn, X-rays masked at random",
        {"": {"masking.image_mode": "random"}},
        "masking.image_mode=random",
    ),
    # Beyond the paper: slices that matter. Phantoms whose lung lesions fit in one slice token
    # but dilute in a 3D token (data.phantom_lesions=small); Table 7's VL+SD vs VL+SD+Attn.
    "small_lesions_vl_sd": Row(
        "small lesions: VL+SD, random slices",
        {"": {"data.phantom_lesions": "small", "selection.mode": "random"}},
        "data.phantom_lesions=small selection.mode=random",
    ),
    "small_lesions_unimedi": Row(
        "small lesions: VL+SD+Attn (UniMedI)",
        {"": {"data.phantom_lesions": "small"}},
        "data.phantom_lesions=small",
    ),
    "small_lesions_oracle": Row(
        "small lesions: VL+SD, oracle slices (upper bound)",
        {"": {"data.phantom_lesions": "small", "selection.mode": "oracle"}},
        "data.phantom_lesions=small selection.mode=oracle: slices inside the ground-truth "
        "lesions in training",
    ),
}
PAPER_ROWS = ("separate", "vl", "vl_sd", "unimedi", "random_masking")  # what ablate runs unasked
FIGURE_ROWS = ("separate", "vl", "unimedi")  # the paper's Figs. 2/7 and 6
TABLE7_ROWS = ("vl", "vl_sd", "unimedi", "random_masking")  # its Table 7
XRAY_MASKING_ROWS = ("vl", "unimedi", "xray_unmasked", "xray_mask_quarter", "xray_random_masking")
SMALL_LESION_ROWS = ("small_lesions_vl_sd", "small_lesions_unimedi", "small_lesions_oracle")
TSNE_FILE = "tsne_fig2.png"  # the paper's Figs. 2/7
# (file, its rows, rows drawn beside them for reference, caption): drawn when one of its rows was
# run, with a panel per row run.
TSNE_FIGURES = (
    (TSNE_FILE, FIGURE_ROWS, (), "t-SNE of the held-out X-rays and CTs per model"),
    (
        "tsne_xray_masking.png",
        ("xray_unmasked", "xray_mask_quarter", "xray_random_masking"),
        ("unimedi",),
        "t-SNE per model: masking the X-rays",
    ),
    ("tsne_small_lesions.png", SMALL_LESION_ROWS, (), "t-SNE per model: small lesions"),
)


def run_dir(out: Path, row: str, part: str, seed: int) -> Path:
    return out / "runs" / (f"{row}-{part}" if part else row) / f"seed{seed}"


def run_config(
    base: ml_collections.ConfigDict, overrides: Mapping[str, Any], seed: int, budget_steps: int
) -> ml_collections.ConfigDict:
    """``base`` with a row part's ``overrides`` (dotted field -> value), the seed and the budget
    (0: the preset's total_steps); in-loop evaluation off (each run is evaluated once, at its
    end)."""
    config = copy.deepcopy(base)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    config.seed = seed
    if budget_steps:
        config.total_steps = budget_steps
    config.eval_every_steps = 0
    return config


def evaluate_run(workdir: Path, evals: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the run's configured evaluators (``evals``: these instead) except the shared-space
    ones on its latest checkpoint and stores its held-out embeddings for them
    (``RUN_EMBEDDINGS``)."""
    model = trained_model.load(workdir)
    config = model.config
    if evals is not None:
        config.evals = tuple(evals)
    chosen = [e for e in evaluators.from_config(config) if e.name not in SHARED_SPACE]
    results = evaluators.run_evaluators(model, config, chosen)
    data = evaluators.build_eval_set(model, config, config.eval_split, config.eval_limit)
    arrays = {}
    for key, m in data.modalities.items():
        modality = "2d" if key == "image" else "3d"
        arrays[f"{key}_emb"] = m.image_emb
        arrays[f"{key}_labels"] = m.labels
        arrays[f"{key}_findings"] = np.asarray(
            figures.label_names(config, modality, config.eval_split)
        )
    arrays["dataset"] = np.asarray(data.dataset)
    with (
        written_atomically(workdir / RUN_EMBEDDINGS, is_dir=False) as partial,
        open(partial, "wb") as f,
    ):
        np.savez(f, **arrays)
    return results


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: Path, reevaluate: bool = False
) -> dict[str, float]:
    """The run's figures: read back when it is done (``reevaluate``: computed again by the
    evaluators ``config`` names, e.g. ones added since), else trained (resuming its
    checkpoints) and evaluated. A finished run of another budget is refused rather than mixed
    in."""
    record = workdir / RUN_RESULTS
    if record.is_file():
        done = json.loads(record.read_text())
        if done["total_steps"] != config.total_steps:
            raise AblationError(
                f"{workdir} holds a finished run of {done['total_steps']} steps, not the "
                f"{config.total_steps} asked for (--budget_steps): give another --out, or the "
                "budget it was run with"
            )
        if not reevaluate:
            logging.info("%s: done, skipped", workdir)
            return done["figures"]
        logging.info("%s: done, evaluated again", workdir)
        found = evaluate_run(workdir, config.evals)
    else:
        logging.info("%s: training %d steps", workdir, config.total_steps)
        by_kind.run(config, workdir)
        found = evaluate_run(workdir)
    with written_atomically(record, is_dir=False) as partial:
        partial.write_text(json.dumps({"total_steps": config.total_steps, "figures": found}))
    return found


def _modality(embeddings: Mapping[str, np.ndarray], key: str) -> evaluators.Modality:
    """A modality of the stored embeddings, as the shared-space evaluators read it."""
    return evaluators.Modality(
        arrays=None,
        labels=embeddings[f"{key}_labels"],
        reports=[],
        image_emb=embeddings[f"{key}_emb"],
        text_emb=None,
        lesion_slices=None,
    )


def shared_space(
    image: Mapping[str, np.ndarray], volume: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Cross-modal mAP and 2D-3D distance of X-ray embeddings (``image``, a run's stored
    arrays) against CT embeddings (``volume``), by the evaluators of the same names."""
    data = evaluators.EvalSet(
        str(image["dataset"]),
        {"image": _modality(image, "image"), "volume": _modality(volume, "volume")},
        {},
        None,
        0,
    )
    return {
        **evaluators.cross_modal(None, data),
        **evaluators.modality_distance(None, data),
    }


def load_embeddings(workdir: Path) -> dict[str, np.ndarray]:
    """A finished run's stored held-out embeddings, labels and finding names."""
    with np.load(workdir / RUN_EMBEDDINGS) as stored:
        return dict(stored)


def summarize(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and spread (sample standard deviation, ddof=1; NaN for one seed) over seeds of
    every figure all seeds have."""
    names = sorted(set.intersection(*(set(found) for found in per_seed.values())))
    mean, spread = {}, {}
    for name in names:
        values = np.asarray([found[name] for found in per_seed.values()], np.float64)
        mean[name] = float(values.mean())
        spread[name] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return {"mean": mean, "spread": spread}


def run_row(
    out: Path,
    name: str,
    base: ml_collections.ConfigDict,
    seeds: Sequence[int],
    budget: int,
    reevaluate: bool = False,
) -> dict[str, Any]:
    """Trains and evaluates every part and seed of row ``name`` (``reevaluate``: finished runs
    too, as ``train_and_evaluate``); its per-seed figures with the shared-space ones, their
    mean and spread."""
    row = ROWS[name]
    per_seed = {}
    for seed in seeds:
        found, stored = {}, {}
        for part, overrides in row.parts.items():
            workdir = run_dir(out, name, part, seed)
            config = run_config(base, overrides, seed, budget)
            prepare_demo_data(config, out)  # phantoms built once per setting, into out/data*
            figures_of_part = train_and_evaluate(config, workdir, reevaluate)
            clash = set(found) & set(figures_of_part)
            assert not clash, f"parts of row {name} report the same figures {sorted(clash)}"
            found.update(figures_of_part)
            stored[part] = load_embeddings(workdir)
        image = next(s for s in stored.values() if "image_emb" in s)
        volume = next(s for s in stored.values() if "volume_emb" in s)
        found.update(shared_space(image, volume))
        per_seed[seed] = found
    return {
        "label": row.label,
        "note": row.note,
        "overrides": {part: dict(o) for part, o in row.parts.items()},
        "seeds": {str(seed): found for seed, found in per_seed.items()},
        **summarize(per_seed),
    }


# ----------------------------------------------------------------------------- the report

_FIXED_COLUMNS = {
    "figures": [
        ("X-ray→CT mAP", "cross_modal/image_to_volume_mAP"),
        ("CT→X-ray mAP", "cross_modal/volume_to_image_mAP"),
        ("2D-3D distance ↓", "cross_modal/distance_2d_3d"),
    ],
    "table7": [
        ("X-ray R@1 (img→txt)", "retrieval_image/image_to_text/R@1"),
        ("CT R@1 (img→txt)", "retrieval_volume/image_to_text/R@1"),
        ("zero-shot AUROC X-ray", "zero_shot_image/mean_auroc"),
        ("zero-shot AUROC CT", "zero_shot_volume/mean_auroc"),
        ("slice hit rate", "slice_selection/hit_rate"),
    ],
    "small_lesions": [
        ("zero-shot AUROC CT", "zero_shot_volume/mean_auroc"),
        ("CT nodule", "zero_shot_volume/auroc/nodule"),
        ("CT consolidation", "zero_shot_volume/auroc/consolidation"),
        ("CT ground glass", "zero_shot_volume/auroc/ground_glass_opacity"),
        ("CT R@1 (img→txt)", "retrieval_volume/image_to_text/R@1"),
        ("slice hits: nodule", "slice_selection/hit_rate/nodule"),
        ("consolidation", "slice_selection/hit_rate/consolidation"),
        ("ground glass", "slice_selection/hit_rate/ground_glass_opacity"),
    ],
    # The slice_choice evaluator: CT zero-shot with the joint pass's slices chosen otherwise.
    "slice_choice": [
        ("mean: Eq. 2 slices", "zero_shot_volume/mean_auroc"),
        ("no slices", "slice_choice/none/mean_auroc"),
        ("random", "slice_choice/random/mean_auroc"),
        ("oracle", "slice_choice/oracle/mean_auroc"),
        ("nodule: Eq. 2 slices", "zero_shot_volume/auroc/nodule"),
        ("no slices", "slice_choice/none/auroc/nodule"),
        ("random", "slice_choice/random/auroc/nodule"),
        ("oracle", "slice_choice/oracle/auroc/nodule"),
    ],
}
_MODALITY_NAME = {"image": "X-ray", "volume": "CT"}


def _probe_columns(names: set[str]) -> list[tuple[str, str]]:
    """Linear-probe columns (``linear_probe_<modality>/<metric>@<fraction>``) by modality and
    label fraction."""
    columns = []
    for key, modality in _MODALITY_NAME.items():
        found = [n for n in names if n.startswith(f"linear_probe_{key}/")]
        for name in sorted(found, key=lambda n: float(n.rsplit("@", 1)[1])):
            metric, fraction = name.split("/", 1)[1].rsplit("@", 1)
            columns.append((f"probe {modality} {metric} {float(fraction):.0%}", name))
    return columns


def _cell(row: Mapping[str, Any], key: str) -> str:
    if key not in row["mean"]:
        return "–"
    mean, spread = row["mean"][key], row["spread"][key]
    return f"{mean:.3f}" if math.isnan(spread) else f"{mean:.3f} ± {spread:.3f}"


def _table(
    title: str, rows: Mapping[str, Mapping[str, Any]], columns, probes: bool = True
) -> list[str]:
    names = {n for row in rows.values() for n in row["mean"]}
    columns = [c for c in columns if c[1] in names] + (_probe_columns(names) if probes else [])
    lines = [f"### {title}", "", "| row | " + " | ".join(h for h, _ in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for row in rows.values():
        cells = [_cell(row, key) for _, key in columns]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    notes = [f"- {row['label']}: {row['note']}" for row in rows.values() if row["note"]]
    return [*lines, "", *notes, ""]


def render(report: Mapping[str, Any]) -> str:
    """ablation.md: the two tables, mean ± spread over the seeds, and the figure."""
    rows = report["rows"]
    seeds = ", ".join(map(str, report["seeds"]))
    lines = [
        "# The paper's comparisons on phantoms",
        "",
        f"Preset `{report['preset']}`, {report['budget_steps']} steps per run, seeds {seeds}; "
        "each cell is the mean ± sample standard deviation (ddof=1) over the seeds, on the "
        f"held-out `{report['eval_split']}` split. 2D-3D distance: per finding, the distance "
        "between the X-ray and CT centroids relative to the groups' spread (lower is closer).",
        "",
    ]
    figure_rows = {n: rows[n] for n in FIGURE_ROWS if n in rows}
    table7_rows = {n: rows[n] for n in TABLE7_ROWS if n in rows}
    xray_rows = {n: rows[n] for n in XRAY_MASKING_ROWS if n in rows}
    if figure_rows:
        lines += _table("Figs. 2/7 and 6: one common space", figure_rows, _FIXED_COLUMNS["figures"])
    if table7_rows:
        lines += _table("Table 7: the designs one by one", table7_rows, _FIXED_COLUMNS["table7"])
    if any(n.startswith("xray_") for n in xray_rows):
        columns = _FIXED_COLUMNS["figures"] + _FIXED_COLUMNS["table7"]
        lines += _table("Beyond the paper: masking the X-rays", xray_rows, columns)
    small_rows = {n: rows[n] for n in SMALL_LESION_ROWS if n in rows}
    if small_rows:
        title = "Beyond the paper: slices that matter (small lesions; per finding)"
        lines += _table(title, small_rows, _FIXED_COLUMNS["small_lesions"])
        if any(n.startswith("slice_choice/") for row in small_rows.values() for n in row["mean"]):
            title = "Small lesions: CT zero-shot by the slices the model is shown (evaluation)"
            lines += _table(title, small_rows, _FIXED_COLUMNS["slice_choice"], probes=False)
    for file, caption in (report.get("tsne") or {}).items():
        lines += [f"![{caption}]({file})", ""]
    return "\n".join(lines)


def draw_tsne(out: Path, rows: Sequence[str], seed: int) -> dict[str, str]:
    """The t-SNE figures of ``TSNE_FIGURES`` whose rows were run, each a panel per row: the
    held-out X-ray and CT embeddings of its run of ``seed`` (row (a): each from its own
    model). Returns {file name: caption} of the figures drawn."""
    drawn = {}
    for file, own, reference, caption in TSNE_FIGURES:
        if not any(n in rows for n in own):
            continue
        panels = {}
        for name in (n for n in (*reference, *own) if n in rows):
            stored = [load_embeddings(run_dir(out, name, part, seed)) for part in ROWS[name].parts]
            groups, classes = {}, {}
            for modality, key in (("X-ray (2D)", "image"), ("CT (3D)", "volume")):
                arrays = next(s for s in stored if f"{key}_emb" in s)
                groups[modality] = arrays[f"{key}_emb"]
                classes[modality] = figures.finding_classes(
                    arrays[f"{key}_labels"], list(arrays[f"{key}_findings"])
                )
            panels[ROWS[name].label] = (groups, classes)
        with written_atomically(out / file, is_dir=False) as partial:
            figures.tsne_side_by_side(panels).savefig(partial, dpi=110)
        drawn[file] = caption
    return drawn


def run_ablation(
    base: ml_collections.ConfigDict,
    out: str | Path,
    rows: Sequence[str] = tuple(ROWS),
    seeds: Sequence[int] = (0, 1),
    budget_steps: int = 0,
    reevaluate: bool = False,
) -> dict[str, Any]:
    """Trains, evaluates and tabulates ``rows`` for ``seeds`` (``reevaluate``: finished runs
    evaluated again by today's evaluators, not trained again); writes out/ablation.json,
    out/ablation.md and the t-SNE figure, and returns the report."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise AblationError(
            f"--rows={','.join(rows)} names unknown rows {unknown}; valid: {', '.join(ROWS)}"
        )
    if not seeds:
        raise AblationError("--seeds is empty: give at least one seed, e.g. --seeds=0,1")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = budget_steps or base.total_steps
    report = {
        "preset": base.get("preset", ""),
        "budget_steps": budget,
        "seeds": list(seeds),
        "eval_split": base.eval_split,
        "rows": {name: run_row(out, name, base, seeds, budget, reevaluate) for name in rows},
    }
    report["tsne"] = draw_tsne(out, rows, seeds[0])
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    (out / "ablation.md").write_text(render(report))
    return report
