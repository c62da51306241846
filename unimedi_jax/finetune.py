"""``python -m unimedi_jax.finetune``: fine-tune a checkpoint's vision encoder on a 3D dataset.

    python -m unimedi_jax.finetune --config=configs/finetune.py:dataset=cc_ccii \
        --workdir=runs/paper --out=runs/paper/finetune/cc_ccii

An alias of ``python -m unimedi_jax.main`` (same flags, same dispatch on the config's kind) that
takes fine-tuning configs only: ``--workdir`` is the pre-training run (or one of its
``checkpoints/<step>``), ``--out`` the new folder. Writes ``out/eval.json`` (test accuracy and
AUROC of the best-validation epoch, the history) and ``out/metrics.jsonl``; see
``unimedi_jax/trainers/finetuning.py``.
"""

from __future__ import annotations

from absl import app, flags

from unimedi_jax import main as command
from unimedi_jax.core.app import run_app


def main(argv: list[str]) -> None:
    if flags.FLAGS.config.get("kind") != "finetune":
        raise app.UsageError("--config must be configs/finetune.py:dataset=NAME")
    command.main(argv)


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
