"""Errors a user can act on, and how they are reported.

Imports nothing of the project and nothing heavy (absl only, no jax), so every layer can raise
them, data_pipelines and the PyTorch-only side included: a ``UserError`` becomes one paragraph
on stderr naming the class, and exit status 2, without a traceback. Anything else is a bug and
keeps its traceback. ``core.app.run_app`` runs every command under this handler.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import flags
from absl.app import UsageError

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (a flag, a config field, a file): reported as one paragraph
    naming what was wrong and what to do, exit status 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message says which field and what to do."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes the handler reports as user mistakes: ours, a missing file, and
    absl's flag and usage mistakes."""
    return (UserError, FileNotFoundError, UsageError, flags.Error)


def report(err: BaseException) -> NoReturn:
    """Prints ``error: <Class>: <message>`` as one paragraph on stderr and exits 2."""
    message = re.sub(r"\s*\n\s*", " ", str(err)).strip()
    print(f"error: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


class MissingExtraError(UserError):
    """A command needs a package of an extra that this install left out."""


VIZ_EXTRA = ("matplotlib", "sklearn")  # the `viz` extra of pyproject.toml


def require_extra(command: str, extra: str, modules: Sequence[str]) -> None:
    """Reports a MissingExtraError (exit 2) naming ``extra`` when one of its ``modules`` is not
    installed. Commands call it before importing what needs them, so the report comes before
    any flag is parsed instead of an import traceback."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        report(
            MissingExtraError(
                f"{command} needs {', '.join(modules)}, which the base install leaves out "
                f"({', '.join(missing)} missing): install the {extra} extra, pip install "
                f"'unimedi-jax[{extra}]' (from a checkout: pip install -e '.[{extra}]')."
            )
        )


def reporting_user_errors(
    fn: Callable[..., Any], also: tuple[type[BaseException], ...] = ()
) -> Callable[..., Any]:
    """``fn`` with user errors (and ``also``) reported by ``report`` (exit 2); anything else
    propagates with its traceback."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if isinstance(err, user_error_types() + also):
                report(err)
            raise

    return wrapped
