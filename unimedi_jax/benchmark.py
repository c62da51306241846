"""Train-step speed of a config: compile time, step time, throughput, FLOPs, MFU, memory.

    python -m unimedi_jax.benchmark --config=configs/pretrain.py[:preset] [--steps 10]
        [--peak_tflops X] [--compare_unrolled] [--config.batch.size_2d=32 ...]
    python -m unimedi_jax.benchmark --config=... --variant=attention=xla
        --variant=attention=cudnn,remat=dots [--batches=96x48,48x24] [--json=FILE]

Times the real trainer's step on random batches of the config's shapes (no data, no Hugging Face
weights; for the paper config add ``--config.text.vocab_size=28996``), one process, all its
devices, and prints markdown tables for docs/benchmarks.md. How FLOPs, MFU and data time are
measured: ``unimedi_jax/diagnostics/step_benchmark.py``. With ``--variant`` (each a comma-separated
list of ``config.model`` overrides; ``config`` alone: none) it times each variant instead, one
table row each, at the first of ``--batches`` that fits on the devices.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from unimedi_jax.core.app import run_app
from unimedi_jax.core.paths import define_path
from unimedi_jax.diagnostics.step_benchmark import (
    step_report,
    variant_rows,
    variant_table,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/pretrain.py:demo", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after one warm-up step.", lower_bound=1)
_PEAK = flags.DEFINE_float(
    "peak_tflops", None, "Peak TFLOP/s of one device, for MFU (default: from the device kind)."
)
_COMPARE = flags.DEFINE_bool(
    "compare_unrolled", False, "Also compile and time the step with unrolled layer scans."
)
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "config.model overrides of one variant, e.g. attention=cudnn,remat=dots."
)
_BATCHES = flags.DEFINE_string(
    "batches", "", "Global batches (2D x 3D) to try in turn per variant (default: the config's)."
)
_JSON = define_path("json", "With --variant: also write the rows to this file.")
flags.mark_flag_as_required("config")


def parse_variant(text: str) -> dict[str, object]:
    """'attention=cudnn,unroll_layers=true' -> {'attention': 'cudnn', 'unroll_layers': True}."""
    if text == "config":
        return {}
    pairs = (item.split("=", 1) for item in text.split(","))
    return {k: {"true": True, "false": False}.get(v.lower(), v) for k, v in pairs}


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    if not _VARIANTS.value:
        print(step_report(config, _STEPS.value, _PEAK.value, _COMPARE.value))
        return
    batches = [tuple(int(n) for n in b.split("x")) for b in _BATCHES.value.split(",") if b]
    batches = batches or [(config.batch.size_2d, config.batch.size_3d)]
    variants = [parse_variant(v) for v in _VARIANTS.value]
    rows = []
    for row in variant_rows(config, variants, batches, _STEPS.value, _PEAK.value):
        rows.append(row)  # each row written as it comes: a run cut short keeps the rows done
        print(variant_table([row]).splitlines()[-1], flush=True)
        if _JSON.value:
            Path(_JSON.value).write_text(json.dumps(rows, indent=1))
    print(variant_table(rows))


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
