"""``python -m unimedi_jax.evaluate``: evaluate a checkpoint and write ``eval.json``.

Pre-training evaluators, ``--workdir=W``: reads the run's saved config
(``--config`` replaces it; ``--config.X=Y`` overrides fields of ``--config`` or, without it,
of the saved config), runs every evaluator the config's ``evals`` names (retrieval Recall@K,
zero-shot AUROC, cross-modal mAP, slice-selection hit rate, linear probe), each on its held-out
split and limit (``eval_split``/``eval_limit``, or its ``eval_settings.<name>``), whatever its
in-loop schedule, and writes ``W/eval.json`` (the run's newest checkpoint) or
``W/eval-step<N>.json`` (an earlier one, ``--workdir=W/checkpoints/<N>``): the figures of
in-loop evaluation and the ``step`` they measure (``evaluation/checkpoint_results.py``). The
figures are printed once, as ``name value`` lines.

Linear probe (paper Tables 1-2), ``--config=configs/probe.py:dataset=NAME[,fraction=F]
--workdir=PATH``: writes ``<run workdir>/probe/<dataset>-<fractions>[-random_init]/eval.json``
(or ``--out=DIR``: ``DIR/eval.json``); see ``unimedi_jax/evaluation/downstream.py``.

Zero-shot and retrieval benchmarks, ``--config=configs/zero_shot.py:dataset=NAME --workdir=RUN
--out=DIR``: writes ``DIR/eval.json`` (default ``<run workdir>/zero_shot/<benchmark>``); see
``unimedi_jax/evaluation/zero_shot.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from absl import app
from ml_collections import config_flags

from unimedi_jax import inference
from unimedi_jax.core.app import parse_absl_flags, run_app
from unimedi_jax.core.overrides import apply_overrides, config_given, override_args
from unimedi_jax.core.paths import define_path, shown_path
from unimedi_jax.evaluation import downstream, zero_shot
from unimedi_jax.evaluation.checkpoint_results import write_checkpoint_result
from unimedi_jax.evaluation.evaluators import evaluate_checkpoint

_WORKDIR = define_path("workdir", "The run (its latest checkpoint) or <run>/checkpoints/<step>.")
_OUT = define_path(
    "out", "Where eval.json goes (default: the run's workdir; probes: under probe/)."
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional config replacing the run's, or configs/probe.py:dataset=NAME."
)


def _probe_lines(results: dict) -> list[str]:
    return [
        f"{results['encoder']} {results['dataset']} at {fraction} of the labels: "
        f"{results['metric']} {found[results['metric']]:.4f} (n_train {found['n_train']}, "
        f"best epoch {found['best_epoch']})"
        for fraction, found in results["fractions"].items()
    ]


def _figure_lines(results: dict) -> list[str]:
    """A pre-training evaluation as aligned ``name value`` lines, its step first."""
    figures = {k: v for k, v in results.items() if k != "step"}
    width = max(map(len, figures), default=0)
    return [
        f"step {results['step']}",
        *(f"{name:<{width}} {value:.4f}" for name, value in sorted(figures.items())),
    ]


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parsing, except that without ``--config`` the ``--config.X=Y`` overrides are
    passed on to ``main`` (after the positional arguments) for the run's saved config."""
    overrides = [] if config_given(argv) else override_args(argv)
    return [*parse_absl_flags([a for a in argv if a not in overrides]), *overrides]


def main(argv: list[str]) -> None:
    overrides = override_args(argv[1:])
    path, out = _WORKDIR.value, _OUT.value
    if not path:
        raise app.UsageError("--workdir=RUN (or RUN/checkpoints/STEP) is required")
    config = _CONFIG.value
    kind = config.get("kind") if config is not None else None
    if kind == "finetune":
        raise app.UsageError("fine-tuning configs run with python -m unimedi_jax.finetune")
    if kind == "probe":
        results = downstream.probe(config, path)
        written = downstream.write_eval_json(
            out or downstream.default_out_dir(config, path), results
        )
        lines = _probe_lines(results)
    elif kind == "zero_shot":
        results = zero_shot.evaluate(config, path)
        written = downstream.write_eval_json(
            out or zero_shot.default_out_dir(config, path), results
        )
        lines = [json.dumps(results, indent=2, sort_keys=True)]
    else:
        workdir = inference.resolve_run(path)[0]
        if overrides:
            config = apply_overrides(inference.load_config(workdir), overrides)
        results = evaluate_checkpoint(path, config)
        written = write_checkpoint_result(Path(out or workdir), workdir, results)
        lines = _figure_lines(results)
    print("\n".join([*lines, f"wrote {shown_path(str(written))}"]))


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
