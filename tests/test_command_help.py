"""``--help`` of every installed command: its own flags, one line each, and how to list and set
config fields; the libraries' flags stay under ``--helpfull``."""

import json
import subprocess
import sys
import tomllib

from tests.tiny_runs import ROOT, subprocess_env

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
LIBRARY_FLAGS = ("--verbosity", "--logtostderr", "--grain_", "--tfds_", "--jax_", "--pdb")

# Runs each console script's function with --help in one process (the libraries load once):
# before each, the project's flags of the command before are removed and its module is
# imported afresh, as a new process would.
_DRIVER = """
import contextlib, importlib, io, json, sys
from absl import flags
from unimedi_jax.core.app import _is_own
texts = {}
for script, target in json.loads(sys.argv[1]).items():
    own = flags.FLAGS.flags_by_module_dict().items()
    for name in {flag.name for module, found in own if _is_own(module) for flag in found}:
        delattr(flags.FLAGS, name)
    module, function = target.split(":")
    for name in [m for m in sys.modules if m in (module, "unimedi_jax.main")]:
        package, _, child = name.rpartition(".")
        del sys.modules[name]
        vars(sys.modules[package]).pop(child, None)
    sys.argv, out = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        getattr(importlib.import_module(module), function)()
    texts[script] = out.getvalue()
print(json.dumps(texts))
"""


def test_help_of_every_command_lists_its_own_flags_and_the_config_fields():
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(SCRIPTS)],
        cwd=ROOT,
        env={**subprocess_env(), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads(proc.stdout.splitlines()[-1])
    assert sorted(outputs) == sorted(SCRIPTS)
    for script, text in outputs.items():
        if "\nFlags: none." not in text:
            flag_lines = text.split("\nFlags:\n")[1].split("\n\n")[0].splitlines()
            assert flag_lines and all(line.startswith("  --") for line in flag_lines), script
        assert not any(name in text for name in LIBRARY_FLAGS), script
        assert "--helpfull" in text, script
        if "  --config:" in text:
            assert "--config.FIELD=VALUE" in text and "--print_config" in text, script
    train = outputs["unimedi-train"]
    for flag in ("--config:", "--workdir:", "--out:", "--print_config:"):
        assert f"\n  {flag}" in train, flag
    assert "\n  --workdir:" in outputs["unimedi-finetune"]
    assert "\n  --format:" in outputs["unimedi-export"]
    assert "\n  --data_dir:" in outputs["unimedi-prepare"]


def test_print_config_shows_the_overridden_fields_without_a_workdir():
    """docs/configs.md's line."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unimedi_jax.main",
            "--config=configs/pretrain.py:demo",
            "--config.model.mlp_dim=96",
            "--print_config",
        ],
        cwd=ROOT,
        env={**subprocess_env(), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mlp_dim: 96" in proc.stdout and "total_steps: 1000" in proc.stdout
