"""``python -m unimedi_jax.ablate``: the paper's comparisons (Figs. 2/7 and 6, Table 7) on phantoms.

    python -m unimedi_jax.ablate --out=runs/ablation [--budget_steps=N] [--seeds=0,1]
        [--rows=separate,vl,vl_sd,unimedi,random_masking] [--config=configs/pretrain.py:demo]
        [--reevaluate]

Trains every row (config overrides of the preset; ``unimedi_jax/experiments/ablation.py``,
``ROWS``: the paper's five unless ``--rows`` names others: the X-ray masking rows
``xray_unmasked``, ``xray_mask_quarter``, ``xray_random_masking``, or the small-lesion rows
``small_lesions_vl_sd``, ``small_lesions_unimedi``, ``small_lesions_oracle``) for every seed at
one budget, in ``--out/runs/<row>/seed<S>``, evaluates each on the held-out phantoms and writes
``--out/ablation.md`` (mean ± spread over seeds), ``ablation.json`` and the side-by-side
t-SNEs. Finished runs are skipped and interrupted ones resume, so the same command continues an
ablation; ``--reevaluate`` evaluates the finished runs again with today's evaluators (after
one was added) without training them again. ``--config.X=Y`` overrides the preset for every
row.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from unimedi_jax.core.app import run_app
from unimedi_jax.core.errors import VIZ_EXTRA, require_extra
from unimedi_jax.core.paths import define_path, shown_path

require_extra("ablate", "viz", VIZ_EXTRA)  # its t-SNE figure
from unimedi_jax.experiments.ablation import PAPER_ROWS, ROWS, run_ablation  # noqa: E402

_OUT = define_path("out", "Folder of the ablation: runs, tables, figures.")
_BUDGET = flags.DEFINE_integer(
    "budget_steps", 0, "Training steps of every run (0: the preset's total_steps).", lower_bound=0
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of every row (comma-separated).")
_ROWS = flags.DEFINE_list(
    "rows", list(PAPER_ROWS), f"Rows to run, of: {', '.join(ROWS)} (default: the paper's)."
)
_REEVALUATE = flags.DEFINE_bool(
    "reevaluate", False, "Evaluate finished runs again with today's evaluators (no training)."
)
_CONFIG = config_flags.DEFINE_config_file("config", None, "The preset the rows change.")
flags.mark_flags_as_required(["out"])


def main(argv: list[str]) -> None:
    del argv
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError as err:
        raise app.UsageError(f"--seeds takes integers, e.g. --seeds=0,1 ({err})") from err
    run_ablation(_CONFIG.value, _OUT.value, _ROWS.value, seeds, _BUDGET.value, _REEVALUATE.value)
    logging.info("wrote %s/ablation.md and ablation.json", _OUT.value)
    print(f"wrote {shown_path(_OUT.value)}/ablation.md")


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main, default_config="configs/pretrain.py:demo")


if __name__ == "__main__":
    cli()
