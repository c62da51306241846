"""``python -m unimedi_jax.results_table DIRS...``: downstream results as the paper's tables.

    python -m unimedi_jax.results_table runs/paper [runs/demo ...] [--plot=ct_rate.png]

Prints Markdown tables laid out like the paper's Tables 1-3 (and an "Other" table for the other
datasets) from the probe and fine-tuning ``eval.json`` files at or under the paths given, and a
table per zero-shot benchmark under the field's published rows; see
``unimedi_jax/evaluation/paper_tables.py``. ``--plot`` also draws the CT-RATE zero-shot
comparison (``unimedi_jax/evaluation/comparison_plot.py``; the viz extra).
"""

from __future__ import annotations

from absl import app

from unimedi_jax.core.app import run_app
from unimedi_jax.core.paths import define_path, shown_path
from unimedi_jax.evaluation.comparison_plot import write_comparison_plot
from unimedi_jax.evaluation.paper_tables import find_results, tables_of

_PLOT = define_path(
    "plot", "Also draw the CT-RATE zero-shot comparison (mean AUROC per method) as this PNG."
)


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError(
            "give the run workdirs, probe folders or eval.json files to tabulate, e.g. "
            "python -m unimedi_jax.results_table runs/paper"
        )
    print(tables_of(paths), end="")
    if _PLOT.value:
        write_comparison_plot([r for _, r in find_results(paths)], _PLOT.value)
        print(f"\nwrote {shown_path(_PLOT.value)}")


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
