"""Compile and forward time of the ViT encoder on a 2D batch and a 3D+slices batch.

    python -m unimedi_jax.benchmark_encoder [--batch_2d 8] [--batch_3d 2] [--repeats 5]

Prints a table (median of ``repeats`` timed forward passes after one warm-up); figures go to
docs/benchmarks.md with the machine and date. A benchmark, not a test. The timing lives in
``unimedi_jax/diagnostics/encoder_benchmark.py``.
"""

from __future__ import annotations

import platform

import jax
from absl import flags

from unimedi_jax.core.app import run_app
from unimedi_jax.diagnostics.encoder_benchmark import HEADER, encoder_rows

_BATCH_2D = flags.DEFINE_integer("batch_2d", 8, "X-rays per batch.", lower_bound=1)
_BATCH_3D = flags.DEFINE_integer("batch_3d", 2, "Volumes per batch.", lower_bound=1)
_K = flags.DEFINE_integer("k", 4, "Selected slices per volume.", lower_bound=0)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forward passes.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv: list[str]) -> None:
    del argv
    print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})")
    print(f"ViT-B/16, dtype {_DTYPE.value}, median of {_REPEATS.value} runs")
    print(HEADER)
    rows = encoder_rows(_BATCH_2D.value, _BATCH_3D.value, _K.value, _REPEATS.value, _DTYPE.value)
    print("\n".join(rows))


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
