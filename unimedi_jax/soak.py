"""Soak test of exact resume: a run SIGKILLed N times in a row ends where an uninterrupted one does.

    python -m unimedi_jax.soak --root=/tmp/soak --kills=10 -- \\
        --config=configs/pretrain.py:demo --config.total_steps=60 --config.eval_every_steps=0

Arguments after ``--`` go to ``python -m unimedi_jax.main`` (without ``--workdir``). Trains once
without interruption in ``ROOT/reference``, then in ``ROOT/killed`` runs the same command and
SIGKILLs it ``--kills`` times in a row at random moments (in steps, in checkpoint writes, in
start-up), lets the last start run to the end and compares the two runs bit for bit. Prints a
JSON summary; exit status 0 when the runs are equal, 1 when they differ. How the kill moments
are drawn: ``unimedi_jax/diagnostics/resume_soak.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from unimedi_jax.core.app import run_app
from unimedi_jax.core.paths import define_path
from unimedi_jax.diagnostics.resume_soak import soak

_ROOT = define_path("root", "Directory for both runs.")
_KILLS = flags.DEFINE_integer("kills", 10, "SIGKILLs in a row.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
_MAX_JITTER_S = flags.DEFINE_float("max_jitter_s", 1.0, "Most delay after the kill step.")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 3600.0, "Time limit of each run.")
flags.mark_flag_as_required("root")


def main(argv: list[str]) -> int:
    main_args = argv[1:]  # absl leaves what follows "--" here
    if not any(a.startswith("--config=") for a in main_args):
        raise app.UsageError(
            "give the training arguments after --, e.g. python -m unimedi_jax.soak --root=DIR "
            "-- --config=configs/pretrain.py:demo"
        )
    summary = soak(
        Path(_ROOT.value),
        main_args,
        _KILLS.value,
        _SEED.value,
        _MAX_JITTER_S.value,
        _TIMEOUT_S.value,
    )
    print(json.dumps(summary, indent=2))
    return 0 if summary["outcome"] == "equal" else 1


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
