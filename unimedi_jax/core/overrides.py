"""``--config.X=Y`` overrides: unknown names fail before anything starts, with the valid names.

Free of jax (absl and ml_collections only). ``parse_flags`` parses a command line whose
``--config`` flag (ml_collections) checks the override names against the config it has just
loaded, before it applies them, so each config file runs once; ``apply_overrides`` gives
evaluate the same overrides on a run's saved config. Either way the config's path fields come
out absolute.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from unimedi_jax.core.errors import ConfigError
from unimedi_jax.core.paths import absolute_config_paths


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


PACKAGED_CONFIGS = "unimedi_configs"  # the wheel's copy of configs/ (pyproject.toml)


def packaged_config_dir() -> Path | None:
    """configs/ as installed (the ``unimedi_configs`` package), or the checkout's configs/ when
    the project runs from a checkout that was not installed."""
    spec = importlib.util.find_spec(PACKAGED_CONFIGS)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parents[2] / "configs"
    return checkout if (checkout / "pretrain.py").is_file() else None


def resolve_config_file(argument: str) -> str:
    """A ``--config`` value (``FILE[:ARG]``) whose FILE does not exist under the working
    directory, e.g. ``configs/pretrain.py:tiny`` run outside a checkout, pointed at the
    packaged configs; an existing file, or one the packaged configs lack, is left as given."""
    file, sep, arg = argument.partition(":")
    if not file or Path(file).exists() or Path(file).is_absolute():
        return argument
    packaged = packaged_config_dir()
    relative = Path(file).parts[1:] if Path(file).parts[0] == "configs" else Path(file).parts
    if packaged is None or not relative or not (packaged.joinpath(*relative)).is_file():
        return argument
    return f"{packaged.joinpath(*relative)}{sep}{arg}"


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with its ``--config=FILE[:ARG]`` (or ``--config FILE[:ARG]``) resolved by
    ``resolve_config_file``."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + resolve_config_file(a[len("--config=") :])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_file(out[i + 1])
    return out


def override_args(argv: Sequence[str]) -> list[str]:
    """The ``--config.X=Y`` arguments of a command line."""
    return [a for a in argv if a.startswith("--config.")]


def check_override_names(argv: Sequence[str], config: ml_collections.ConfigDict) -> None:
    """Unknown ``--config.X=Y`` fields of ``argv`` fail with the closest names, checked against
    ``config`` (the config the ``--config`` flag loaded, or a run's saved config)."""
    for dotted in (a[len("--config.") :].split("=", 1)[0] for a in override_args(argv)):
        node, walked = config, []
        for name in dotted.split("."):
            is_section = isinstance(node, ml_collections.ConfigDict)
            if not is_section or name not in node:
                raise _unknown_field(
                    dotted, walked, name, sorted(node.keys()) if is_section else []
                )
            node, walked = node[name], [*walked, name]


class _CheckingLoader(flags.ArgumentParser):
    """The ``--config`` flag's file loader, followed by the override-name check of ``argv``."""

    def __init__(self, loader: flags.ArgumentParser, argv: Sequence[str]):
        self._loader, self._argv = loader, argv

    def parse(self, argument: str) -> Any:
        config = self._loader.parse(argument)
        check_override_names(self._argv, config)
        return config

    def flag_type(self) -> str:
        return self._loader.flag_type()


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """``flag_values(argv)``, the unknown ``--config.X`` names of ``argv`` failing as
    ConfigError with the closest names (ml_collections would fail on the first with a bare
    AttributeError), checked against the config the ``--config`` flag loads: the file runs once.
    A ``--config`` file missing under the working directory is taken from the packaged configs.
    The config's path fields come out absolute (``absolute_config_paths``).
    """
    argv = resolve_config_args(argv)
    if "config" not in flag_values:
        return flag_values(list(argv))
    flag = flag_values["config"]
    if not config_given(argv):  # the flag's own default config, already loaded
        if flag.value is not None:
            check_override_names(argv, flag.value)
        rest = flag_values(list(argv))
    else:
        rest = _parse_checking_overrides(flag_values, argv)
    if flag.value is not None:
        absolute_config_paths(flag.value)
    return rest


def _parse_checking_overrides(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """``flag_values(argv)`` with the ``--config`` flag's loader checking the override names."""
    flag = flag_values["config"]
    loader = flag.parser
    flag.parser = _CheckingLoader(loader, argv)
    try:
        return flag_values(list(argv))
    except flags.IllegalFlagValueError as err:  # absl rewraps a ValueError of the loader
        if isinstance(err.__context__, ConfigError):
            raise err.__context__ from None
        # ml_collections rewraps the config file's own ValueError (e.g. an unknown preset)
        # with its traceback as text: the original's message is the paragraph to report.
        original = getattr(err.__context__, "__context__", None)
        if isinstance(err.__context__, ValueError) and isinstance(original, ValueError):
            raise ConfigError(f"--config: {original}") from None
        raise
    finally:
        flag.parser = loader


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
    from ml_collections import config_flags

    check_override_names(overrides, config)
    argv = ["overrides", *overrides]
    flag_values = flags.FlagValues()
    copied = ml_collections.ConfigDict(_lists_as_tuples(config.to_dict()))
    config_flags.DEFINE_config_dict("config", copied, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    absolute_config_paths(flag_values.config)
    return flag_values.config
