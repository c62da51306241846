"""``python -m unimedi_jax.finetune``: fine-tune a checkpoint's vision encoder on a 3D dataset.

    python -m unimedi_jax.finetune --config=configs/finetune.py:dataset=cc_ccii \
        --checkpoint=runs/paper --workdir=runs/paper/finetune/cc_ccii

Writes ``workdir/eval.json`` (test accuracy and AUROC of the best-validation epoch, the history)
and ``workdir/metrics.jsonl``; see ``unimedi_jax/train/finetuning.py``.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from unimedi_jax.core.errors import run_app
from unimedi_jax.train.finetuning import finetune

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/finetune.py:dataset=NAME")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Pre-training run workdir (latest checkpoint) or <workdir>/checkpoints/<step>.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory: eval.json, metrics.jsonl.")
flags.mark_flags_as_required(["config", "checkpoint", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    if _CONFIG.value.get("kind") != "finetune":
        raise app.UsageError("--config must be configs/finetune.py:dataset=NAME")
    results = finetune(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value)
    print(json.dumps({k: results[k] for k in ("dataset", "encoder", "best_epoch", "test")}))


if __name__ == "__main__":
    run_app(main)
