"""``--help`` of every installed command: its own flags, one line each, and how to list and set
config fields; the libraries' flags stay under ``--helpfull``."""

import os
import subprocess
import sys
import tomllib

import pytest

from tests.command_driver import run_commands
from tests.tiny_runs import ROOT, subprocess_env
from unimedi_jax.core.paths import absolute_path, is_path_field

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
LIBRARY_FLAGS = ("--verbosity", "--logtostderr", "--grain_", "--tfds_", "--jax_", "--pdb")

# Flags that name a file or folder, besides the config-field spellings (``is_path_field``).
PATH_FLAGS = ("workdir", "out", "root", "json", "reference", "plot")


@pytest.fixture(scope="module")
def help_and_flag_types() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Each console script's ``--help`` text and its own flags' types (one process)."""
    results = run_commands(
        {script: (target, ["--help"]) for script, target in SCRIPTS.items()},
        {**subprocess_env(), "JAX_PLATFORMS": "cpu"},
    )
    for script, result in results.items():
        assert result["code"] == 0, (script, result["stderr"][-2000:])
    return (
        {script: result["stdout"] for script, result in results.items()},
        {script: result["flag_types"] for script, result in results.items()},
    )


def test_help_of_every_command_lists_its_own_flags_and_the_config_fields(help_and_flag_types):
    outputs, _ = help_and_flag_types
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


def test_every_flag_naming_a_file_or_folder_takes_relative_and_absolute_alike(
    help_and_flag_types,
):
    """Path flags are parsed to absolute paths where the command reads them (core/paths.py)."""
    _, types = help_and_flag_types
    path_flags = {
        (script, name): kind
        for script, flag_types in types.items()
        for name, kind in flag_types.items()
        if name in PATH_FLAGS or is_path_field(name)
    }
    assert ("unimedi-prepare", "data_dir") in path_flags and (
        "unimedi-train",
        "workdir",
    ) in path_flags
    assert {key for key, kind in path_flags.items() if kind != "path"} == set()
    assert absolute_path("runs/x") == os.path.join(os.getcwd(), "runs", "x")


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
