"""A tiny training run's config on a small prepared phantom set, for tests that call ``train``.

The demo preset builds 2,400 phantoms per modality on first use; 40 training records are enough
for a few steps and take a fraction of a second. Imported as ``tests.tiny_runs``.
"""

import os
from pathlib import Path

import ml_collections

from configs.pretrain import get_config
from data_pipelines.prepare import ensure_prepared

ROOT = Path(__file__).resolve().parents[1]


def tiny_run_config(data_dir: Path, **overrides) -> ml_collections.ConfigDict:
    """The tiny preset reading small phantoms prepared in ``data_dir`` (built if missing),
    without in-loop evaluation, with ``overrides`` of top-level fields."""
    config = get_config("tiny")
    ensure_prepared(
        "phantoms",
        data_dir,
        image_size=config.model.image_size[0],
        volume_shape=tuple(config.model.volume_size),
        num_train=40,
        num_validation=0,
        num_test=8,
    )
    config.data.data_dir = str(data_dir)
    config.update(eval_every_steps=0, **overrides)
    return config


def subprocess_env() -> dict[str, str]:
    """The environment for a test's subprocess: this one (with conftest.py's fast compilation
    and the run's shared compilation cache) and the repository on ``PYTHONPATH``."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}
