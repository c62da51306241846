"""The project as users install it: a wheel built from the checkout holds every module and the
configs, names a console script for every command, and trains the tiny preset from an empty
directory with only the wheel (installed with ``pip --target``) on the path.

Also the ``--config`` resolution the wheel relies on (core/overrides.py): a path missing under
the working directory is taken from the packaged configs, an existing file wins.
"""

import ast
import configparser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax.core.overrides import resolve_config_args, resolve_config_file
from unimedi_jax.diagnostics.resume_soak import logged_steps

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("unimedi_jax", "data_pipelines", "configs", "pyproject.toml", "README.md")
# The console scripts the README names, and the module each runs.
NAMED_SCRIPTS = {
    "unimedi-train": "unimedi_jax.main",
    "unimedi-evaluate": "unimedi_jax.evaluate",
    "unimedi-finetune": "unimedi_jax.finetune",
    "unimedi-export": "unimedi_jax.export",
    "unimedi-visualize": "unimedi_jax.visualize",
    "unimedi-embed": "unimedi_jax.embed",
    "unimedi-prepare": "data_pipelines.prepare",
    "unimedi-benchmark": "unimedi_jax.benchmark",
}
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the checkout (the build writes build/ beside its sources)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copyfile
        kwargs = {"ignore": ignore} if (ROOT / name).is_dir() else {}
        copy(ROOT / name, src / name, **kwargs)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (built,) = (root / "dist").glob("unimedi_jax-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        check=True,
        capture_output=True,
    )
    return target


def test_the_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        p.relative_to(ROOT).as_posix()
        for package in ("unimedi_jax", "data_pipelines")
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    expected |= {f"unimedi_configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    expected |= {
        f"unimedi_configs/{folder}/{p.name}"
        for folder in ("prompts", "published")
        for p in (ROOT / "configs" / folder).iterdir()
    }
    assert expected - names == set()
    assert {n for n in names if n.startswith("tests/")} == set()


def command_modules() -> set[str]:
    """The checkout's commands: the modules `python -m` runs (a ``__main__`` block)."""
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for package in ("unimedi_jax", "data_pipelines")
        for p in (ROOT / package).glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text()
    }


def test_every_command_has_a_console_script_calling_its_cli(wheel):
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = (n for n in archive.namelist() if n.endswith("entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read_string(archive.read(entry_points).decode())
    scripts = dict(parser["console_scripts"])
    assert {name: scripts.get(name) for name in NAMED_SCRIPTS} == {
        name: f"{module}:cli" for name, module in NAMED_SCRIPTS.items()
    }
    targets = {target.removesuffix(":cli") for target in scripts.values()}
    assert targets == command_modules()
    # One path: `python -m` runs the cli() the script runs. Read, not imported: the commands
    # define the same absl flags, so one process imports one of them.
    for module in targets:
        source = (ROOT / module.replace(".", "/")).with_suffix(".py").read_text()
        functions = {f.name for f in ast.parse(source).body if isinstance(f, ast.FunctionDef)}
        assert "cli" in functions, module
        assert source.rstrip().endswith('if __name__ == "__main__":\n    cli()'), module


def test_the_base_install_leaves_the_plots_to_the_viz_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "matplotlib" not in base and "scikit-learn" not in base and "ruff" not in base
    viz = " ".join(project["optional-dependencies"]["viz"])
    assert "matplotlib" in viz and "scikit-learn" in viz
    assert any("ruff" in d for d in project["optional-dependencies"]["dev"])


def test_the_tiny_preset_trains_from_an_empty_directory(installed, tmp_path):
    data_dir = tmp_path / "data"
    tiny_run_config(data_dir)  # prepared by the checkout: the run reads it, nothing more
    env = {**subprocess_env(), "PYTHONPATH": str(installed)}
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import unimedi_jax, unimedi_configs; print(unimedi_jax.__file__)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed)
    script = installed / "bin" / "unimedi-train"
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--config=configs/pretrain.py:tiny",
            f"--workdir={workdir}",
            "--config.total_steps=2",
            "--config.eval_every_steps=0",
            f"--config.data.data_dir={data_dir}",
        ],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged_steps(workdir) == [1, 2]
    assert list(os.scandir(empty)) == []


def test_a_config_missing_here_resolves_to_the_packaged_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = ROOT / "configs" / "pretrain.py"  # the checkout's configs when not installed
    resolved = resolve_config_file("configs/pretrain.py:tiny")
    path, _, preset = resolved.partition(":")
    assert preset == "tiny"
    assert Path(path).read_bytes() == packaged.read_bytes()
    assert resolve_config_args(["x", "--config", "configs/probe.py"])[2].endswith("probe.py")
    assert resolve_config_file("configs/nonexistent.py") == "configs/nonexistent.py"
    # A file that exists under the working directory wins.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pretrain.py").write_text("")
    assert resolve_config_file("configs/pretrain.py:tiny") == "configs/pretrain.py:tiny"


@pytest.mark.parametrize(
    ("command", "args"),
    [("visualize", "'tsne', '--workdir=run', '--out=t.png'"), ("ablate", "'--out=ablation'")],
)
def test_commands_without_the_viz_extra_name_it(command, args):
    hide = (
        "import sys, runpy; sys.modules['matplotlib'] = None; "
        f"sys.argv = ['{command}', {args}]; "
        f"runpy.run_module('unimedi_jax.{command}', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "MissingExtraError" in proc.stderr and "unimedi-jax[viz]" in proc.stderr
