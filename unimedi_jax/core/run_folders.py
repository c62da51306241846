"""What a folder holds, and writing a command's output without harming a run.

Every command that writes a run records its kind in the run's ``config.json`` (``kind``:
``pretrain`` or ``finetune``); folders written before that are recognised by their files. A
command that writes a new run refuses a folder holding another kind of run, and ``export`` and
``visualize`` write their ``--out`` into a temporary sibling that is renamed into place only when
complete, never into (or over) the run they read. Imports nothing heavy (no jax).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from unimedi_jax.core.errors import UserError

PRETRAIN, FINETUNE, PROBE, EXPORT = "pretrain", "finetune", "probe", "export"
_DESCRIPTIONS = {
    PRETRAIN: "a pre-training run",
    FINETUNE: "a fine-tuning run",
    PROBE: "a linear-probe result",
    EXPORT: "a PyTorch export",
}
RUN_TEXT_TOWER = "text_tower"  # a run's copy of text.path's config and tokenizer (core/text_tower)
_EXPORT_WEIGHTS = "model.safetensors"  # export.WEIGHTS (export imports jax and torch names)


class RunFolderError(UserError):
    """A folder given to a command holds something that command must not read or overwrite."""


def _json(path: Path) -> dict | None:
    """A JSON object file's content; None when missing, unreadable or not an object."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def run_kind(folder: str | Path) -> str | None:
    """The kind of run ``folder`` holds (PRETRAIN, FINETUNE, PROBE, EXPORT), None for none
    (missing, empty or other files), or 'unknown' for a config.json no command wrote.

    Runs written before the kind was recorded: a pre-training config.json has ``model`` and
    ``text``; a fine-tuning or probe folder has only its eval.json, which names its kind.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / _EXPORT_WEIGHTS).exists():
        return EXPORT
    if (folder / "config.json").exists():
        config = _json(folder / "config.json") or {}
        if config.get("kind") in _DESCRIPTIONS:
            return config["kind"]
        return PRETRAIN if {"model", "text"} <= config.keys() else "unknown"
    kind = (_json(folder / "eval.json") or {}).get("kind")
    if kind in (FINETUNE, PROBE):
        return kind
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return PRETRAIN
    return None


def describe(kind: str) -> str:
    """'a pre-training run', ... for messages; a folder of unknown kind by its config.json."""
    return _DESCRIPTIONS.get(kind, "a config.json that no unimedi_jax command wrote")


def check_new_run(folder: str | Path, kind: str, flag: str = "--workdir") -> None:
    """Refuses ``folder`` for a run of ``kind`` when it holds another kind of run, before
    anything is written there (the two runs' metrics, eval.json and config.json would mix)."""
    found = run_kind(folder)
    if found is not None and found != kind:
        raise RunFolderError(
            f"{flag}={folder} holds {describe(found)}, and this command writes "
            f"{describe(kind)} there: its config.json, metrics.jsonl and eval.json would "
            f"overwrite that one's. Choose a new folder for {flag}."
        )


def check_output(out: str | Path, run_dir: str | Path, overwrite: bool, is_dir: bool) -> None:
    """Refuses an ``--out`` that is the run's folder, inside it or above it; one holding another
    kind of run; and an existing file or non-empty folder unless ``overwrite``."""
    out, run_dir = Path(out), Path(run_dir)
    target, run = out.resolve(), run_dir.resolve()
    if target == run or run in target.parents or target in run.parents:
        where = "is" if target == run else "is inside" if run in target.parents else "contains"
        raise RunFolderError(
            f"--out={out} {where} the folder of the run it reads ({run_dir}); writing there "
            "would overwrite or mix with the run's files (config.json, checkpoints). Choose an "
            f"--out outside {run_dir}."
        )
    if not out.exists():
        return
    wanted = "folder" if is_dir else "file"
    if out.is_dir() != is_dir:
        raise RunFolderError(f"--out={out} exists and is not a {wanted}; choose another --out.")
    found = run_kind(out) if is_dir else None
    if found not in (None, EXPORT):
        raise RunFolderError(
            f"--out={out} holds {describe(found)}, which an export must not replace, even with "
            "--overwrite. Choose another --out."
        )
    if not overwrite and (not is_dir or any(out.iterdir())):
        raise RunFolderError(
            f"--out={out} exists{'' if not is_dir else ' and is not empty'}; pass --overwrite "
            f"to replace it, or choose another --out."
        )


@contextlib.contextmanager
def written_atomically(out: str | Path, is_dir: bool) -> Iterator[Path]:
    """Yields a temporary sibling of ``out`` to write into; when the block completes, it
    replaces ``out`` (a folder as a whole), so ``out`` is never seen half written. On an error
    the temporary sibling is removed and ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial-{os.getpid()}{out.suffix}")
    _remove(partial)  # a leftover of an earlier process with the same id
    if is_dir:
        partial.mkdir()
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if not is_dir:
        os.replace(partial, out)
    elif out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        partial.rename(out)
    elif out.exists():  # --overwrite: the old folder goes only once the new one is in place
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        _remove(old)
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old)
    else:
        partial.rename(out)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
