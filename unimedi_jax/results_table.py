"""``python -m unimedi_jax.results_table DIRS...``: downstream results as the paper's tables.

    python -m unimedi_jax.results_table runs/paper [runs/demo ...]

Prints Markdown tables laid out like the paper's Tables 1-3 (and an "Other" table for the other
datasets) from the probe and fine-tuning ``eval.json`` files at or under the paths given; see
``unimedi_jax/evaluation/paper_tables.py``.
"""

from __future__ import annotations

from absl import app

from unimedi_jax.core.app import run_app
from unimedi_jax.evaluation.paper_tables import tables_of


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError(
            "give the run workdirs, probe folders or eval.json files to tabulate, e.g. "
            "python -m unimedi_jax.results_table runs/paper"
        )
    print(tables_of(paths), end="")


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
