"""Errors a user can act on, and the one handler every command runs under.

Imports nothing heavy (no jax), so every command and the PyTorch-only side can use it: a
``UserError`` (or one of data_pipelines' own error classes, which cannot subclass it because
data_pipelines never imports this package's modules) becomes one paragraph on stderr naming the
class, and exit status 2, without a traceback. Anything else is a bug and keeps its traceback.
Every command (absl flags) runs under it:

    if __name__ == "__main__":
        run_app(main)
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

EXIT_USER_ERROR = 2

# User errors of other packages, by module: absl's flag and usage mistakes and data_pipelines'
# own classes. Each is looked up only once its module is loaded (an error of a module that was
# never imported cannot have been raised), which keeps this module free of imports.
_OTHER_ERRORS = (
    ("absl.app", "UsageError"),
    ("absl.flags", "Error"),
    ("data_pipelines.pipeline", "DataConfigError"),
    ("data_pipelines.prepare", "PreparedDataMismatchError"),
    ("data_pipelines.builders", "UnknownDatasetError"),
    ("data_pipelines.builders.common", "LayoutError"),
    ("data_pipelines.failure_limit", "TooManyFailuresError"),
)


class UserError(Exception):
    """A mistake the user can fix (a flag, a config field, a file): reported as one paragraph
    naming what was wrong and what to do, exit status 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message says which field and what to do."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes the handler reports as user mistakes."""
    found: list[type[BaseException]] = [UserError, FileNotFoundError]
    for module_name, class_name in _OTHER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None:
            found.append(getattr(module, class_name))
    return tuple(found)


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


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with unknown ``--config.X`` names named as soon as the config loads
    and flag mistakes (unknown flag, missing required flag, bad value) reported with exit 2."""
    from absl import flags

    from unimedi_jax.config.overrides import parse_flags

    return parse_flags(flags.FLAGS, argv)


def run_app(
    main: Callable[[list[str]], Any],
    flags_parser: Callable[[Sequence[str]], list[str]] = parse_absl_flags,
    default_config: str | None = None,
    also: tuple[type[BaseException], ...] = (),
) -> None:
    """Entry point of every command: ``app.run`` (which exits with ``main``'s return value) with
    flag parsing and ``main`` handled. ``default_config``: the ``--config`` file when none is
    given (a config flag defined with a default would apply the overrides while its module is
    imported, out of reach here). ``also``: more exception classes this command reports as user
    mistakes (data_pipelines' builders report a bad option as ValueError)."""
    from absl import app

    from unimedi_jax.config.overrides import config_given
    from unimedi_jax.core.host_memory import restart_with_huge_pages

    if main.__module__.startswith("unimedi_jax."):  # our console scripts (`python -m` did it
        restart_with_huge_pages()  # in unimedi_jax/__init__.py, before importing JAX)

    def parse(argv: Sequence[str]) -> list[str]:
        if default_config is not None and not config_given(argv):
            argv = [argv[0], f"--config={default_config}", *argv[1:]]
        return flags_parser(argv)

    app.run(reporting_user_errors(main, also), flags_parser=reporting_user_errors(parse, also))
