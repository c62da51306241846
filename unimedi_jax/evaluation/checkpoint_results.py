"""Where the evaluation of a pre-training checkpoint is written, so that each step keeps its own
result: ``eval.json`` holds the run's newest checkpoint's figures, ``eval-step<N>.json`` those of
an earlier one, each with its ``step``. An ``eval.json`` of an older step (the run trained on
since) is renamed to its own ``eval-step<N>.json`` before the newer one takes its place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LATEST = "eval.json"


def step_result_name(step: int) -> str:
    """The file name of an earlier checkpoint's result."""
    return f"eval-step{step}.json"


def newest_step(workdir: Path) -> int | None:
    """The step of the newest complete checkpoint of a run (orbax names it by its step alone)."""
    directory = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    return max(steps, default=None)


def _step_of(path: Path) -> int | None:
    """The step an existing result names (results of earlier versions name none)."""
    return json.loads(path.read_text()).get("step") if path.is_file() else None


def write_checkpoint_result(directory: Path, workdir: Path, results: dict[str, Any]) -> Path:
    """Writes ``results`` (with their ``step``) under ``directory`` by the rule above; returns
    the file written."""
    step, directory = results["step"], Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LATEST
    if step != newest_step(workdir):
        path = directory / step_result_name(step)
    elif (previous := _step_of(path)) is not None and previous != step:
        path.rename(directory / step_result_name(previous))
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def result_of_step(workdir: Path, step: int) -> dict[str, Any] | None:
    """The evaluation of checkpoint ``step`` written in the run, or None."""
    for path in (Path(workdir) / LATEST, Path(workdir) / step_result_name(step)):
        if _step_of(path) == step:
            return json.loads(path.read_text())
    return None
