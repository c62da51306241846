"""The evaluators' names and per-evaluator settings as config data.

Config data, free of jax, so config files and ``upgrade.py`` read them below the evaluation
layer; the evaluators themselves are ``evaluation.evaluators.EVALUATORS`` (a test keeps the
names equal).
"""

from __future__ import annotations

NAMES = (
    "retrieval",
    "zero_shot",
    "cross_modal",
    "modality_distance",
    "slice_hit_rate",
    "slice_choice",
    "linear_probe",
)


def inherit_defaults() -> dict[str, dict[str, int | str]]:
    """``eval_settings``: each evaluator on the run-wide ``eval_every_steps`` (-1),
    ``eval_split`` ('') and ``eval_limit`` (-1) until a field replaces one."""
    return {name: {"every_steps": -1, "split": "", "limit": -1} for name in NAMES}
