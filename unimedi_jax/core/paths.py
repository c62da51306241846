"""Paths as a command reads them: relative or absolute alike, made absolute once, at the edge.

A user types ``--workdir=runs/demo`` or ``--config.data.data_dir=data``; the libraries below
(orbax among them) and a run's saved config.json then see one spelling of each folder, so a
run resumes, evaluates and exports the same from any working directory.
"""

from __future__ import annotations

import os

import ml_collections
from absl import flags


def absolute_path(path: str) -> str:
    """``path`` made absolute against the working directory (``~`` expanded)."""
    return os.path.abspath(os.path.expanduser(path))


def shown_path(path: str) -> str:
    """How a command prints a path: relative to the working directory when under it, as the
    user most likely typed it; absolute otherwise."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


class _PathParser(flags.ArgumentParser):
    """A flag's value as an absolute path (``absolute_path``)."""

    def parse(self, argument: str) -> str:
        return absolute_path(argument)

    def flag_type(self) -> str:
        return "path"


def define_path(
    name: str,
    help_text: str,
    default: str | None = None,
    flag_values: flags.FlagValues = flags.FLAGS,
    required: bool = False,
) -> flags.FlagHolder:
    """A flag naming a file or folder, given relative or absolute: its value is absolute."""
    return flags.DEFINE(
        _PathParser(),
        name,
        default,
        help_text,
        flag_values=flag_values,
        serializer=flags.ArgumentSerializer(),
        required=required,
    )


def is_path_field(name: str) -> bool:
    """Config fields that name a file or folder: ``path`` and ``*_dir`` (``text.path``,
    ``data.data_dir``)."""
    return name == "path" or name.endswith("_dir")


def absolute_config_paths(config: ml_collections.ConfigDict) -> None:
    """Makes the path fields of ``config`` (``is_path_field``) absolute, in place. Empty fields
    (nothing named) and placeholders in angle brackets (a missing package's fix, reported at
    start-up) are left as they are."""
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            absolute_config_paths(value)
        elif is_path_field(name) and isinstance(value, str) and value and value[0] != "<":
            config[name] = absolute_path(value)
