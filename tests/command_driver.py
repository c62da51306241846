"""Many command lines in one Python process, each run as a fresh process would run it.

A command in a subprocess costs its imports (JAX, flax, TFDS: about 2.5 s of CPU) each time;
tests that only check what a command prints or how it exits run their command lines here,
where the libraries load once. Before each command line the project's flags of the one before
(and its ``--config.X`` overrides) are removed and its module imported afresh, so its flags
are defined anew and parsed from its own arguments. What a case returns: its exit status, its
stdout and stderr (an exception that escapes the command is written to stderr as its
traceback, as Python would), and the types of the command's own flags.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_DRIVER = """
import contextlib, importlib, io, json, sys, traceback
from absl import app, flags
from unimedi_jax.core.app import _is_own

def own_flags():
    own = flags.FLAGS.flags_by_module_dict().items()
    return {flag.name: flag for module, found in own if _is_own(module) for flag in found}

results = {}
for case, (target, argv) in json.loads(sys.argv[1]).items():
    for name in [*own_flags(), *(n for n in flags.FLAGS if n.startswith("config."))]:
        delattr(flags.FLAGS, name)  # ml_collections registers --config.X under absl's name
    module, _, function = target.partition(":")
    for name in [m for m in sys.modules if m in (module, "unimedi_jax.main")]:
        package, _, child = name.rpartition(".")
        del sys.modules[name]
        vars(sys.modules[package]).pop(child, None)
    app._register_and_parse_flags_with_usage.done = False  # absl allows one app.run a process
    flags.FLAGS.unparse_flags()
    sys.argv, out, err, code = [module, *argv], io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            getattr(importlib.import_module(module), function or "cli")()
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    types = {name: flag.flag_type() for name, flag in own_flags().items()}
    results[case] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                     "flag_types": types}
print(json.dumps(results))
"""


def run_commands(
    cases: Mapping[str, tuple[str, Sequence[str]]],
    env: Mapping[str, str],
    cwd: Path = ROOT,
    timeout_s: float = 600,
) -> dict[str, dict]:
    """``cases``: name -> (``module`` or ``module:function`` (default ``cli``), arguments).
    Returns name -> {code, stdout, stderr, flag_types}."""
    given = json.dumps({name: [target, list(argv)] for name, (target, argv) in cases.items()})
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, given],
        cwd=cwd,
        # Huge pages re-execute a command's process (core/host_memory.py): not this one's.
        env={**env, "PYTHONPATH": str(ROOT), "UNIMEDI_HUGE_PAGES": "0"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])
