"""A run's workdir across restarts: may its checkpoints be resumed with the config given now?

A restart whose config gives the train state other shapes (model or text sizes, the optimizer's
make-up) could not load the checkpoints in ``checkpoints/``, and once it saved its own, the old
run's would be rotated out; so it stops at start, before the data is read or anything compiled.
The state this config gives (``jax.eval_shape`` of its init: traced, not compiled or run) is
compared with the newest checkpoint's saved metadata (shapes and dtypes; no array is read), and
the error names the parameters that changed and the fields in which ``config.json`` (the config
of the run whose checkpoints these are) differs. With ``on_shape_change=restart`` the previous
run's files move to ``previous-<UTC time>/`` instead and training starts at step 0. A restart
of that command then finds its own config and resumes, so the option can stay in a launcher
that preemption reruns. Other changes (learning rate, data sources, ...) resume, with a warning
listing them. Nothing is written before these checks and the restore have passed: a refused
run leaves the workdir as it was.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from unimedi_jax.config.checks import ConfigError
from unimedi_jax.config.upgrade import read_run_config
from unimedi_jax.core.run_folders import RUN_TEXT_TOWER
from unimedi_jax.models.text import BertConfig
from unimedi_jax.models.unimedi import build_unimedi
from unimedi_jax.text_tower.run_setup import text_tower_config
from unimedi_jax.train.checkpoint import DAMAGED_DIR
from unimedi_jax.train.state import TrainState, make_optimizer, state_initializer

# What a run writes and a restart moves aside (the demo's data/ stays).
RUN_FILES = (
    "checkpoints",
    DAMAGED_DIR,
    "config.json",
    "metrics.jsonl",
    "tensorboard",
    "tokenizer",
    RUN_TEXT_TOWER,
    "eval.json",
)
_LISTED_SHAPES = 3  # parameters named in the error; the rest are counted

# "path/of/leaf" -> (shape, dtype name) of each array of a train state.
StateShapes = dict[str, tuple[tuple[int, ...], str]]


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


def abstract_train_state(config: ml_collections.ConfigDict, text_config: BertConfig) -> TrainState:
    """The train state ``config`` gives, as ShapeDtypeStructs (its init traced, never run)."""
    model = build_unimedi(config, text_config, jnp.float32)  # parameters are float32 whatever
    tx = make_optimizer(config.train, optax.constant_schedule(0.0))  # the rate leaves no state
    init = state_initializer(model, tx, config)
    return jax.eval_shape(lambda rng: nn.unbox(init(rng)), jax.random.key(0))


def _key_name(key: Any) -> str:
    for field in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, field):
            return str(getattr(key, field))
    return str(key)


def state_shapes(tree: Any) -> StateShapes:
    """Shape and dtype of each array of a state tree (arrays, ShapeDtypeStructs or orbax's
    saved metadata), by its path: the same path for a TrainState and its checkpoint."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        "/".join(_key_name(k) for k in path): (tuple(leaf.shape), jnp.dtype(leaf.dtype).name)
        for path, leaf in leaves
    }


def saved_state_shapes(directory: Path) -> tuple[int, StateShapes] | None:
    """(step, shapes) of the newest checkpoint under ``directory`` whose metadata reads (orbax
    reads it without the arrays); None when none does (a restore then says why)."""
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        try:
            # orbax takes absolute paths only
            state_dir = (directory / str(step) / "state").absolute()
            metadata = ocp.StandardCheckpointHandler().metadata(state_dir)
        except (OSError, ValueError) as err:  # damaged: the restore skips it too
            logging.warning("checkpoint %d in %s: no readable metadata (%s)", step, directory, err)
            continue
        return step, state_shapes(metadata)
    return None


def shape_changes(saved: StateShapes, current: StateShapes) -> dict[str, tuple[str, str]]:
    """path -> (saved, current) for every array whose shape or dtype differs, or that only one
    of the two holds ('absent'); the parameters come first."""

    def described(found: tuple[tuple[int, ...], str] | None) -> str:
        return "absent" if found is None else f"{found[1]}{list(found[0])}"

    paths = sorted(saved.keys() | current.keys(), key=lambda p: (not p.startswith("params/"), p))
    return {
        path: (described(saved.get(path)), described(current.get(path)))
        for path in paths
        if saved.get(path) != current.get(path)
    }


def _shape_error(
    workdir: Path, step: int, shapes: dict[str, tuple[str, str]], fields: dict
) -> ConfigError:
    listed = dict(list(shapes.items())[:_LISTED_SHAPES])
    more = len(shapes) - len(listed)
    why = (
        f"; its config.json differs in {_describe(fields)} (saved -> now)"
        if fields
        else " (it left no config.json to compare with)"
    )
    return ConfigError(
        f"{workdir} holds checkpoints (newest: step {step}) of a train state whose arrays have "
        f"other shapes than this config gives: {_describe(listed)}"
        f"{f' and {more} more arrays' if more else ''} (saved -> now){why}. They cannot be resumed "
        "with this config. Use another --workdir, set those fields back, or pass "
        f"--config.on_shape_change=restart to move that run to {workdir}/previous-<time>/ "
        "and start at step 0."
    )


def move_previous_run(workdir: Path) -> Path:
    """Moves the files of the run in ``workdir`` to ``workdir/previous-<UTC time>``."""
    target = workdir / f"previous-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    target.mkdir()
    for name in RUN_FILES:
        if (workdir / name).exists():
            (workdir / name).rename(target / name)
    for result in workdir.glob("eval-step*.json"):  # evaluations of earlier checkpoints
        result.rename(target / result.name)
    return target


def _saved_config_json(workdir: Path) -> dict:
    """The config of the run in ``workdir`` (upgraded to today's fields) as JSON, or {}."""
    if not (workdir / "config.json").exists():
        return {}
    return json.loads(read_run_config(workdir).to_json_best_effort())


def check_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Check the run already in ``workdir`` against ``config``: refuse it, or move it aside with
    ``on_shape_change=restart``. Every process checks; process 0 moves once all have checked.
    Writes nothing else: ``record_config`` follows once the restore has succeeded too."""
    config_json = json.loads(config.to_json_best_effort())
    shapes = {}
    if has_checkpoints(workdir):
        fields = changed_fields(_saved_config_json(workdir), config_json)
        saved = saved_state_shapes(workdir / "checkpoints")
        if saved is not None:
            step, saved_shapes = saved
            current = abstract_train_state(config, text_tower_config(config, workdir))
            shapes = shape_changes(saved_shapes, state_shapes(current))
        if shapes and config.on_shape_change != "restart":
            raise _shape_error(workdir, step, shapes, fields)
        if fields and not shapes:
            logging.warning("Resuming %s with a changed config: %s", workdir, _describe(fields))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("workdir checked")
    if jax.process_index() == 0 and shapes:
        moved = move_previous_run(workdir)
        logging.warning("on_shape_change=restart: moved the previous run to %s", moved)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("workdir prepared")


def record_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Writes this run's ``config.json`` (process 0), once nothing can refuse the run."""
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
