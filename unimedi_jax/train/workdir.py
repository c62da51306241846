"""A run's workdir across restarts: may its checkpoints be resumed with the config given now?

``config.json`` records the config of the run whose checkpoints are in ``checkpoints/``. A
restart whose config changes the shapes of the state (model or text sizes) could not load them,
and once it saved its own, the old run's would be rotated out; so it stops at start, naming the
fields, before the data is read or anything compiled; with ``on_shape_change=restart`` the previous
run's files move to ``previous-<UTC time>/`` instead and training starts at step 0. A restart
of that command then finds its own config and resumes, so the option can stay in a launcher
that preemption reruns. Other changes (learning rate, data sources, ...) resume, with a warning
listing them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

from unimedi_jax.config.checks import ConfigError
from unimedi_jax.core.run_folders import PRETRAIN
from unimedi_jax.train.checkpoint import DAMAGED_DIR

# Config fields that decide the shapes of the train state.
SHAPE_FIELDS = (
    "model.width",
    "model.depth",
    "model.num_heads",
    "model.mlp_dim",
    "model.patch_2d",
    "model.patch_3d",
    "model.image_size",
    "model.volume_size",
    "model.embed_dim",
    "model.dino_hidden_dim",
    "model.dino_bottleneck_dim",
    "model.dino_out_dim",
    "text.path",
    "text.max_length",
    "text.vocab_size",
    "text.hidden_size",
    "text.num_layers",
    "text.num_heads",
    "text.intermediate_size",
)
# What a run writes and a restart moves aside (the demo's data/ stays).
RUN_FILES = (
    "checkpoints",
    DAMAGED_DIR,
    "config.json",
    "metrics.jsonl",
    "tensorboard",
    "tokenizer",
    "eval.json",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_fields(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """field -> (saved value, current value) for every leaf that differs (missing: None)."""
    old, new = _flatten(saved), _flatten(current)
    return {
        field: (old.get(field), new.get(field))
        for field in sorted(old.keys() | new.keys())
        if old.get(field) != new.get(field)
    }


def has_checkpoints(workdir: Path) -> bool:
    """Whether a complete checkpoint is there (orbax names one by its step number alone)."""
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{field} {old} -> {new}" for field, (old, new) in changes.items())


def shape_changes(workdir: Path, config_json: dict) -> dict[str, tuple[Any, Any]]:
    """The shape fields in which the saved config differs from ``config_json``; logs the
    other differences."""
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return {}
    saved = {"kind": PRETRAIN, **json.loads(saved_path.read_text())}  # older runs lack it
    changes = changed_fields(saved, config_json)
    shape = {field: change for field, change in changes.items() if field in SHAPE_FIELDS}
    other = {field: change for field, change in changes.items() if field not in SHAPE_FIELDS}
    if other and not shape:
        logging.warning("Resuming %s with a changed config: %s", workdir, _describe(other))
    return shape


def move_previous_run(workdir: Path) -> Path:
    """Moves the files of the run in ``workdir`` to ``workdir/previous-<UTC time>``."""
    target = workdir / f"previous-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    target.mkdir()
    for name in RUN_FILES:
        if (workdir / name).exists():
            (workdir / name).rename(target / name)
    return target


def prepare_workdir(config, workdir: Path) -> None:
    """Check the run already in ``workdir`` against ``config`` (refuse it, or move it aside
    with ``on_shape_change=restart``), then record this run's config. Every process checks;
    process 0 moves and writes once all have checked."""
    config_json = json.loads(config.to_json_best_effort())
    shape = shape_changes(workdir, config_json) if has_checkpoints(workdir) else {}
    if shape and config.on_shape_change != "restart":
        raise ConfigError(
            f"{workdir} holds checkpoints of a run whose config differs in fields that set "
            f"the model's shapes: {_describe(shape)} (saved -> now). They cannot be resumed "
            "with this config. Use another --workdir, set those fields back, or pass "
            f"--config.on_shape_change=restart to move that run to {workdir}/previous-<time>/ "
            "and start at step 0."
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("workdir checked")
    if jax.process_index() == 0:
        if shape:
            moved = move_previous_run(workdir)
            logging.warning("on_shape_change=restart: moved the previous run to %s", moved)
        (workdir / "config.json").write_text(json.dumps(config_json, indent=2))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("workdir prepared")
