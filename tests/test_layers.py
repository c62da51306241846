"""The import direction of README.md's Layout: every module imports only from its own layer or a
lower one, and no modules or packages import each other in a circle.

Read with ``ast`` from the source (imports inside functions included), so a lazy import cannot
hide an upward dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("unimedi_jax", "data_pipelines", "configs")

# Lowest first: (the layer as README.md's Layout names it, the packages or modules it holds).
# ``unimedi_jax`` is the package's __init__ (it runs first); ``commands`` is every other module
# at the top of unimedi_jax/ (each ``python -m unimedi_jax.NAME``).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("unimedi_jax.core", "unimedi_jax")),
    ("models, method", ("unimedi_jax.models", "unimedi_jax.method")),
    ("data_pipelines", ("data_pipelines",)),
    ("config, text_tower", ("unimedi_jax.config", "unimedi_jax.text_tower")),
    ("train", ("unimedi_jax.train",)),
    ("evaluation", ("unimedi_jax.evaluation",)),
    ("trainers, interop", ("unimedi_jax.trainers", "unimedi_jax.interop")),
    ("experiments, diagnostics", ("unimedi_jax.experiments", "unimedi_jax.diagnostics")),
    ("inference, torch_model", ("unimedi_jax.inference", "unimedi_jax.torch_model")),
    ("commands, configs", ("commands", "configs")),
)
README_LINE = " -> ".join(name for name, _ in LAYERS)


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of SOURCES (a package by its __init__)."""
    found = {}
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def unit(module: str) -> str:
    """The package (or top-level module) a module belongs to: the unit of LAYERS."""
    parts = module.split(".")
    if parts[0] != "unimedi_jax":
        return parts[0]
    if len(parts) == 1:
        return module
    if len(parts) == 2 and MODULES[module].name != "__init__.py":
        return (
            module if module in ("unimedi_jax.inference", "unimedi_jax.torch_model") else "commands"
        )
    return ".".join(parts[:2])


LAYER_OF = {member: i for i, (_, members) in enumerate(LAYERS) for member in members}


def layer(module: str) -> int:
    return LAYER_OF[unit(module)]


def _known(name: str) -> str | None:
    """``name`` or its longest prefix that is a module of SOURCES."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def imports(module: str) -> set[str]:
    """The project modules ``module`` imports anywhere in its file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            names = [n for n in submodules if n in MODULES] or [base]
        else:
            continue
        found |= {target for name in names if (target := _known(name)) and target != module}
    return found


GRAPH = {module: imports(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each a cycle's nodes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if unit(m) not in LAYER_OF)
    assert not unplaced, f"modules of no layer (add their package to LAYERS and README): {unplaced}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{MODULES[m].relative_to(ROOT)} imports {t} "
        f"({LAYERS[layer(t)][0]} is above {LAYERS[layer(m)][0]})"
        for m, targets in sorted(GRAPH.items())
        for t in sorted(targets)
        if layer(t) > layer(m)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    found = cycles(GRAPH)
    assert not found, "modules importing each other: " + "; ".join(map(" <-> ".join, found))


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for m, targets in GRAPH.items():
        packages[unit(m)] |= {unit(t) for t in targets if unit(t) != unit(m)}
    found = cycles(packages)
    assert not found, "packages importing each other: " + "; ".join(map(" <-> ".join, found))


def test_the_readme_layout_names_these_layers():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert README_LINE in layout, f"README.md's Layout should name the layers: {README_LINE}"


def test_the_walk_sees_imports_inside_functions_and_finds_cycles():
    assert "data_pipelines.sources" in GRAPH["unimedi_jax.config.preprocessing"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
