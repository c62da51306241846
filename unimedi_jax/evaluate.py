"""``python -m unimedi_jax.evaluate --workdir=W``: run a run's evaluators on its latest checkpoint.

Reads the run's saved config (``--config`` replaces it, ``--config.X=Y`` overrides fields), embeds
the held-out split (``eval_split``) and writes ``W/eval.json``: retrieval Recall@K, zero-shot AUROC,
cross-modal mAP and the slice-selection hit rate, as the config's ``evals`` list asks.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from unimedi_jax import inference
from unimedi_jax.evaluation.evaluators import evaluate_checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (or one of its checkpoint dirs).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config replacing the run's.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    del argv
    workdir, _ = inference.resolve_run(_WORKDIR.value)
    results = evaluate_checkpoint(_WORKDIR.value, _CONFIG.value)
    (workdir / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    width = max(map(len, results))
    for name, value in sorted(results.items()):
        logging.info("%-*s %.4f", width, name, value)
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(app.run(main))
