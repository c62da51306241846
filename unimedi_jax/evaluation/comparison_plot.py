"""The CT-RATE zero-shot comparison as one figure: ``results_table --plot=FILE.png``.

Per method, the mean AUROC over the abnormalities: the published rows (points alone: their
sources give no interval) and each evaluated run with its 95% bootstrap interval, so a reader
sees at a glance where a run stands. The points drawn are also written into the PNG's
``Description`` text (JSON), so the file says what it shows. Needs the ``viz`` extra.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unimedi_jax.core.errors import UserError
from unimedi_jax.core.run_folders import written_atomically
from unimedi_jax.evaluation.paper_tables import ZERO_SHOT_TABLES, row_label

BENCHMARK = "ct_rate"
TITLE = "CT-RATE zero-shot, mean AUROC over 18 abnormalities (CT-CLIP's protocol)"


class PlotError(UserError):
    """No CT-RATE zero-shot result to plot, or no matplotlib."""


def comparison_points(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{'method', 'auroc', 'interval' ([low, high] or None), 'published' (its sources, or
    [] for ours)}]: the published rows first, then each run evaluated on CT-RATE."""
    ours = [r for r in results if r.get("benchmark") == BENCHMARK and "zero_shot" in r]
    if not ours:
        raise PlotError(
            "no CT-RATE zero-shot eval.json among the results: evaluate a run with "
            "configs/zero_shot.py:dataset=ct_rate to plot it against the published figures"
        )
    table = next(t for t in ZERO_SHOT_TABLES if t.benchmark == BENCHMARK)
    published = table.published()
    points = [
        {"method": row.method, "auroc": row.figures["auroc"], "interval": None,
         "published": list(row.sources)}
        for row in (published.rows(table.published_table) if published else ())
        if "auroc" in row.figures
    ]  # fmt: skip
    for result in ours:
        interval = result["zero_shot"].get("mean_auroc_ci")
        points.append(
            {"method": row_label(result), "auroc": result["zero_shot"]["mean_auroc"],
             "interval": list(interval) if interval else None, "published": []}
        )  # fmt: skip
    return points


def comparison_figure(points: Sequence[dict[str, Any]]):
    """A matplotlib Figure (built without pyplot): one row per method, AUROC in %."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise PlotError(
            "--plot needs matplotlib: install the viz extra (pip install 'unimedi-jax[viz]')"
        ) from None
    fig = Figure(figsize=(7.5, 0.35 * len(points) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    for y, point in enumerate(points):
        value = 100 * point["auroc"]
        if point["interval"]:
            low, high = (100 * v for v in point["interval"])
            ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o", color="C3",
                        capsize=3)  # fmt: skip
        else:
            ax.plot(value, y, "o", color="C0" if point["published"] else "C3")
    ax.set_yticks(range(len(points)), [p["method"] for p in points], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean AUROC (%); ours with its 95% bootstrap interval")
    ax.set_title(f"{TITLE}\npublished rows as reported in secondary sources", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def write_comparison_plot(results: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Draws the comparison of ``results`` to PNG ``out`` (appearing only when complete), its
    points in the PNG's Description; returns ``out``."""
    points = comparison_points(results)
    figure = comparison_figure(points)
    with written_atomically(out, is_dir=False) as partial:
        figure.savefig(partial, dpi=110, format="png",
                       metadata={"Title": TITLE, "Description": json.dumps(points)})  # fmt: skip
    return Path(out)
