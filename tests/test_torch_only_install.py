"""The PyTorch-only install (README): the project with ``--no-deps`` and
``requirements-torch.txt``, in a virtual environment where JAX cannot be imported, loads
``unimedi_jax.torch_model`` and the file preprocessing it applies. Offline: the requirements
are the distributions of this environment, linked into the new one, their own dependencies
followed through their metadata as pip would."""

import importlib.metadata as metadata
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from tests.tiny_runs import ROOT

REQUIREMENTS = ROOT / "requirements-torch.txt"
TOOLS = ("pip", "setuptools")  # what installs the project into the new environment


def _requirements() -> list[Requirement]:
    lines = REQUIREMENTS.read_text().splitlines()
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def _closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need, their dependencies included (markers evaluated, extras
    left out), as installed here."""
    found, todo = set(), list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        found.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def test_requirements_keep_the_projects_bounds():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {Requirement(d).name: str(Requirement(d).specifier) for d in declared}
    for requirement in _requirements():
        if requirement.name != "torch":
            assert by_name[requirement.name] == str(requirement.specifier), requirement.name


def test_torch_model_imports_in_an_environment_without_jax(tmp_path):
    venv, packages = tmp_path / "venv", tmp_path / "packages"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    packages.mkdir()
    for name in _closure([r.name for r in _requirements()] + list(TOOLS)):
        distribution = metadata.distribution(name)
        tops = {f.parts[0] for f in distribution.files or () if f.parts[0] != ".."}
        for top in tops - {"__pycache__"}:
            source = distribution.locate_file(top)
            if source.exists() and not (packages / top).exists():
                (packages / top).symlink_to(source)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "requirements.pth").write_text(f"{packages}\n")
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import jax"], capture_output=True).returncode != 0
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    proc = subprocess.run(
        [*install, "--no-build-isolation", "-e", str(ROOT)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "from unimedi_jax import torch_model; from data_pipelines.transforms import "
        "FilePreprocessing; import sys; print(sorted({'jax', 'flax'} & set(sys.modules)))"
    )
    proc = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
