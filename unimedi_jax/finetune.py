"""``python -m unimedi_jax.finetune``: fine-tune a checkpoint's vision encoder on a 3D dataset.

    python -m unimedi_jax.finetune --config=configs/finetune.py:dataset=cc_ccii \
        --checkpoint=runs/paper --workdir=runs/paper/finetune/cc_ccii

An alias of ``python -m unimedi_jax.main`` (same flags, same dispatch on the config's kind) that
takes fine-tuning configs only and requires ``--checkpoint``. Writes ``workdir/eval.json`` (test
accuracy and AUROC of the best-validation epoch, the history) and ``workdir/metrics.jsonl``;
see ``unimedi_jax/train/finetuning.py``.
"""

from __future__ import annotations

from absl import app, flags

from unimedi_jax import main as command
from unimedi_jax.core.errors import run_app

flags.mark_flags_as_required(["checkpoint"])


def main(argv: list[str]) -> None:
    if flags.FLAGS.config.get("kind") != "finetune":
        raise app.UsageError("--config must be configs/finetune.py:dataset=NAME")
    command.main(argv)


if __name__ == "__main__":
    run_app(main)
