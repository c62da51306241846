"""One train step on this machine's default backend; its losses against a reference run's.

    JAX_PLATFORMS=cpu python -m unimedi_jax.device_check --config=configs/pretrain.py \\
        --config.batch.size_2d=4 --config.batch.size_3d=2 --out=cpu.json
    python -m unimedi_jax.device_check --config=configs/pretrain.py \\
        --config.batch.size_2d=4 --config.batch.size_3d=2 --reference=cpu.json --out=gpu.json

Two runs of one config differ only by the backend and the compute dtype (see
``unimedi_jax/diagnostics/backend_check.py``): a GPU step in bfloat16 must give the CPU's
float32 loss within ``--rtol``. With ``--reference`` the exit status is 1 when the total loss is
further off. ``launch/device_check.sh`` runs both and then the benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from unimedi_jax.core.app import run_app
from unimedi_jax.core.paths import define_path
from unimedi_jax.diagnostics.backend_check import comparison_table, loss_verdict, one_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/pretrain.py:demo", lock_config=True
)
_OUT = define_path("out", "Where to write this run's losses (JSON).")
_REFERENCE = define_path("reference", "Losses of a reference run (JSON).")
_RTOL = flags.DEFINE_float("rtol", 1e-2, "Largest relative error of the total loss.")
flags.mark_flags_as_required(["config", "out"])


def main(argv: list[str]) -> int:
    del argv
    result = one_step(_CONFIG.value)
    Path(_OUT.value).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    if _REFERENCE.value is None:
        return 0
    reference = json.loads(Path(_REFERENCE.value).read_text())
    print(comparison_table(result, reference))
    passed, line = loss_verdict(result, reference, _RTOL.value)
    print(line)
    return 0 if passed else 1


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
