"""The trainers by ``config.kind``: which job a config asks for, and what each needs.

``python -m unimedi_jax.main`` (and its alias ``python -m unimedi_jax.finetune``) looks the
config's ``kind`` up here, as scenic's ``train_lib/trainers.py`` does: ``pretrain``
(``configs/pretrain.py``) trains in (or continues) ``--workdir``; ``finetune``
(``configs/finetune.py``) fine-tunes the encoder of the run ``--workdir`` into the new folder
``--out`` (``--workdir`` is the run a command reads or continues, ``--out`` a folder it writes
anew, in every command). Probe configs are evaluations
(``python -m unimedi_jax.evaluate``), not trainers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from unimedi_jax.core.errors import UserError
from unimedi_jax.trainers import finetuning, pretraining

SUMMARY_FIELDS = ("dataset", "encoder", "best_epoch", "test")  # of a fine-tuning eval.json


class TrainerUsageError(UserError):
    """A config and flags that do not make one job (a wrong kind, --out missing or given where
    it has no use)."""


def _pretrain(config: ml_collections.ConfigDict, workdir: Path, out: str | None) -> None:
    if out is not None:
        raise TrainerUsageError(
            f"--out={out} is the new folder of a fine-tuning run (configs/finetune.py); a "
            "pre-training config (kind pretrain) trains in --workdir, or resumes from its own "
            "checkpoints: drop --out"
        )
    pretraining.train(config, workdir)


def _finetune(config: ml_collections.ConfigDict, workdir: Path, out: str | None) -> dict[str, Any]:
    if out is None:
        raise TrainerUsageError(
            f"the fine-tuning config of {config.dataset} (kind finetune) needs --out=DIR, the "
            "new folder of the fine-tuning run, beside --workdir=the pre-training run (its "
            "latest checkpoint) or <run>/checkpoints/<step>"
        )
    results = finetuning.finetune(config, str(workdir), Path(out))
    return {k: results[k] for k in SUMMARY_FIELDS}


# kind -> (config, workdir, out or None) -> a summary to print, or None.
TRAINERS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "pretrain": _pretrain,
    "finetune": _finetune,
}


def run(
    config: ml_collections.ConfigDict, workdir: str | Path, out: str | None = None
) -> dict[str, Any] | None:
    """Runs the trainer of ``config.kind`` on the run ``workdir`` (writing the new folder
    ``out``: fine-tuning); returns what the command prints (None: nothing).

    Raises TrainerUsageError for a kind that is not a trainer's or a missing/extra ``out``."""
    kind = config.get("kind")
    if kind == "probe":
        raise TrainerUsageError(
            "a linear-probe config (configs/probe.py, kind probe) is an evaluation: run it with "
            "python -m unimedi_jax.evaluate --config=configs/probe.py:dataset=NAME "
            "--workdir=RUN"
        )
    if kind not in TRAINERS:
        raise TrainerUsageError(
            f"--config has kind={kind!r}, which no trainer runs; valid kinds: "
            f"{', '.join(TRAINERS)} (configs/pretrain.py, configs/finetune.py)"
        )
    return TRAINERS[kind](config, Path(workdir), out)
