"""``--config.X=Y`` overrides: unknown names fail before anything starts, with the valid names.

Free of jax (only ml_collections), so every command that takes ``--config`` checks its
overrides the same way, data_pipelines' own commands included; ``apply_overrides`` gives
evaluate the same overrides on a run's saved config.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from unimedi_jax.core.errors import ConfigError


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> its ``get_config(arg)``, as ml_collections loads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_checked_config", path)
    if module_spec is None or not Path(path).is_file():
        raise ConfigError(f"--config={spec}: no config file at {path}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _unknown_field(dotted: str, walked: list[str], name: str, valid: list[str]) -> ConfigError:
    """The message for one unknown override: where it failed, the closest and all valid names."""
    where = ".".join(walked)
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {', '.join('.'.join([*walked, c]) for c in close)}?" if close else ""
    return ConfigError(
        f"--config.{dotted}: {'.'.join([*walked, name])} is not a config field.{hint} "
        f"Valid names{' under ' + where if where else ''}: {', '.join(valid)}."
    )


def config_given(argv: Sequence[str]) -> bool:
    """Whether a command line names its config file (``--config=F`` or ``--config F``)."""
    return any(a == "--config" or a.startswith("--config=") for a in argv)


def override_args(argv: Sequence[str]) -> list[str]:
    """The ``--config.X=Y`` arguments of a command line."""
    return [a for a in argv if a.startswith("--config.")]


def check_override_names(
    argv: Sequence[str], default: ml_collections.ConfigDict | None = None
) -> None:
    """Unknown ``--config.X=Y`` fields fail before anything starts, with the closest names.

    The overrides apply to the last ``--config=`` file given, else to ``default`` (the flag's
    default config, or a run's saved config); with neither there is nothing to check here.
    """
    specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in override_args(argv)]
    if not overrides or not (specs or default is not None):
        return
    config = _load_config_file(specs[-1]) if specs else default
    for dotted in overrides:
        node, walked = config, []
        for name in dotted.split("."):
            is_section = isinstance(node, ml_collections.ConfigDict)
            if not is_section or name not in node:
                raise _unknown_field(
                    dotted, walked, name, sorted(node.keys()) if is_section else []
                )
            node, walked = node[name], [*walked, name]


def _lists_as_tuples(value: Any) -> Any:
    """JSON turns a config's tuples into lists, which ml_collections cannot override."""
    if isinstance(value, dict):
        return {k: _lists_as_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_as_tuples(v) for v in value)
    return value


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """A copy of ``config`` (e.g. a run's saved ``config.json``) with ``--config.X=Y``
    arguments applied as ml_collections' config flags apply them (values parsed to each field's
    type, tuples written as ``'(a, b)'``); unknown names raise ConfigError."""
    from absl import flags
    from ml_collections import config_flags

    check_override_names(overrides, default=config)
    argv = ["overrides", *overrides]
    flag_values = flags.FlagValues()
    copied = ml_collections.ConfigDict(_lists_as_tuples(config.to_dict()))
    config_flags.DEFINE_config_dict("config", copied, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config
