"""The entry point every command runs under: flags parsed, ``--config.X`` checked, user
errors reported (``errors.report``: one paragraph, exit 2) and anything else raised; the
libraries' INFO lines kept out; ``--help`` (the command's own flags) and ``--print_config``
answered here. Path flags and config fields are made absolute as they are parsed
(``core/paths.py``).

    if __name__ == "__main__":
        run_app(main)
"""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging
from absl.app import UsageError

from unimedi_jax.core.errors import reporting_user_errors
from unimedi_jax.core.host_memory import restart_with_huge_pages
from unimedi_jax.core.overrides import config_given, parse_flags

HELP_ARGS = ("--help", "-h", "-?", "--helpshort")
_OWN_MODULES = ("unimedi_jax", "data_pipelines")  # flags of the project, not of its libraries


def _is_own(module: str) -> bool:
    """Whether flags registered under ``module`` are the project's (a module name, or the
    script path absl registers a ``python -m`` command's flags under)."""
    return module.startswith(_OWN_MODULES) or any(f"/{m}/" in module for m in _OWN_MODULES)


def command_help(command_doc: str | None) -> str:
    """What ``--help`` prints: the command's docstring, its own flags one line each, how to
    list and set config fields; the libraries' flags are left to ``--helpfull``."""
    by_module = flags.FLAGS.flags_by_module_dict()
    own = {id(f) for m, found in by_module.items() if _is_own(m) for f in found}
    listed, lines = set(), []
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if id(flag) in own and id(flag) not in listed:
            listed.add(id(flag))
            default = "" if flag.default in (None, False, [], "") else f" (default {flag.default})"
            lines.append(f"  --{flag.name}: {' '.join(flag.help.split())}{default}")
    lines = [(command_doc or "").strip(), "", "Flags:" if lines else "Flags: none.", *lines]
    if "config" in flags.FLAGS:
        lines += [
            "",
            "Config fields: --config.FIELD=VALUE sets one (nested: --config.model.mlp_dim=128); "
            "--print_config prints every field of the --config given, with its value; "
            "docs/configs.md explains them.",
        ]
    lines += ["", "The libraries' flags (absl, JAX, TFDS, ...): --helpfull."]
    return "\n".join(lines)


def _print_config(flags_parser: Callable[[Sequence[str]], list[str]], argv: Sequence[str]) -> None:
    """``--print_config``: parses ``argv`` (the flags a run needs may be left out), prints the
    config with its ``--config.X`` overrides applied, and exits 0."""
    try:
        flags_parser(argv)
    except flags.IllegalFlagValueError:  # a required flag left out: not needed here
        if flags.FLAGS.config is None:
            raise
    if flags.FLAGS.config is None:
        raise UsageError("--print_config prints the --config given; none was")
    print(flags.FLAGS.config)
    sys.exit(0)


def shows_in_log(record: std_logging.LogRecord) -> bool:
    """INFO from this project only; libraries (orbax, TFDS, grain) speak at WARNING and up.
    (Python's levels: absl's own constants count WARNING as -1.)"""
    own = ("/unimedi_jax/", "/data_pipelines/")
    return record.levelno >= std_logging.WARNING or any(p in record.pathname for p in own)


def quiet_library_logs() -> None:
    """Applies ``shows_in_log`` to the absl log handler (stderr and log files)."""
    logging.get_absl_handler().python_handler.addFilter(shows_in_log)


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with unknown ``--config.X`` names named as soon as the config loads
    and flag mistakes (unknown flag, missing required flag, bad value) reported with exit 2."""
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
    if main.__module__.startswith("unimedi_jax."):  # our console scripts (`python -m` did it
        restart_with_huge_pages()  # in unimedi_jax/__init__.py, before importing JAX)

    if "config" in flags.FLAGS and "print_config" not in flags.FLAGS:  # once per process
        flags.DEFINE_bool(
            "print_config", False, "Print the config's fields with their values, then stop."
        )
    quiet_library_logs()
    if any(a in HELP_ARGS for a in sys.argv[1:]):
        print(command_help(sys.modules[main.__module__].__doc__))
        sys.exit(0)

    def parse(argv: Sequence[str]) -> list[str]:
        if default_config is not None and not config_given(argv):
            argv = [argv[0], f"--config={default_config}", *argv[1:]]
        if "--print_config" in argv:
            _print_config(flags_parser, argv)
        return flags_parser(argv)

    app.run(reporting_user_errors(main, also), flags_parser=reporting_user_errors(parse, also))
