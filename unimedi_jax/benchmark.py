"""Train-step speed of a config: compile time, step time, throughput, FLOPs, MFU, memory.

    python -m unimedi_jax.benchmark --config=configs/pretrain.py[:preset] [--steps 10]
        [--peak_tflops X] [--compare_unrolled] [--config.batch.size_2d=32 ...]

Times the real trainer's step on random batches of the config's shapes (no data, no Hugging Face
weights; for the paper config add ``--config.text.vocab_size=28996``), one process, all its
devices, and prints markdown tables for docs/benchmarks.md. How FLOPs, MFU and data time are
measured: ``unimedi_jax/diagnostics/step_benchmark.py``.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from unimedi_jax.core.app import run_app
from unimedi_jax.diagnostics.step_benchmark import step_report

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
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    del argv
    print(step_report(_CONFIG.value, _STEPS.value, _PEAK.value, _COMPARE.value))


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
