"""A tiny training run's config on a small prepared phantom set, for tests that call ``train``.

The demo preset builds 2,400 phantoms per modality on first use; 40 training records are enough
for a few steps and take a fraction of a second. Imported as ``tests.tiny_runs``.
"""

from pathlib import Path

import ml_collections

from configs.pretrain import get_config
from data_pipelines.prepare import ensure_prepared
from unimedi_jax.diagnostics.resume_soak import run_env


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


def fast_compile_env(cache_dir: Path) -> dict[str, str]:
    """The environment for subprocess runs of a test: a compilation cache in ``cache_dir``
    shared by its runs, and LLVM at -O0, which halves XLA's compile time on CPU."""
    env = run_env(cache_dir)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return env
