"""One train step on this machine's default backend; its losses against a reference run's.

    JAX_PLATFORMS=cpu python -m unimedi_jax.device_check --config=configs/pretrain.py \\
        --config.batch.size_2d=4 --config.batch.size_3d=2 --out=cpu.json
    python -m unimedi_jax.device_check --config=configs/pretrain.py \\
        --config.batch.size_2d=4 --config.batch.size_3d=2 --reference=cpu.json --out=gpu.json

The initial state comes from the config's seed (threefry draws the same numbers on every backend)
and the batch is the benchmark's fixed random one, so two runs of one config differ only by the
backend and the compute dtype: a GPU step in bfloat16 must give the CPU's float32 loss within
``--rtol``. With ``--reference`` the exit status is 1 when the total loss is further off.
``launch/device_check.sh`` runs both and then the benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from absl import flags

from unimedi_jax.benchmark import (  # also defines the --config flag
    SCHEDULE_STEPS,
    SCHEDULE_WARMUP,
    checked_mesh_and_text,
    device_batch,
)
from unimedi_jax.core.errors import run_app
from unimedi_jax.core.precision import compute_dtype
from unimedi_jax.train.pretraining import build_trainer

_OUT = flags.DEFINE_string("out", None, "Where to write this run's losses (JSON).")
_REFERENCE = flags.DEFINE_string("reference", None, "Losses of a reference run (JSON).")
_RTOL = flags.DEFINE_float("rtol", 1e-2, "Largest relative error of the total loss.")
flags.mark_flag_as_required("out")

LOSS_KEYS = ("loss", "loss_vl", "loss_icl", "loss_pcl")


def one_step(config) -> dict:
    """The first step's loss terms on the default backend, with what ran them."""
    mesh, text = checked_mesh_and_text(config)
    trainer = build_trainer(config, text, mesh, SCHEDULE_STEPS, SCHEDULE_WARMUP)
    _, metrics = trainer.step(trainer.state, device_batch(config, mesh, text))
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "compute_dtype": compute_dtype(config.precision.compute_dtype).name,
        **{key: float(metrics[key]) for key in LOSS_KEYS},
    }


def relative_errors(result: dict, reference: dict) -> dict[str, float]:
    """|result - reference| / |reference| for each loss term."""
    return {
        key: abs(result[key] - reference[key]) / max(abs(reference[key]), 1e-12)
        for key in LOSS_KEYS
    }


def comparison_table(result: dict, reference: dict) -> str:
    """Markdown: each loss term of both runs and their relative error."""

    def ran(r: dict) -> str:
        return f"{r['platform']} {r['compute_dtype']}"

    errors = relative_errors(result, reference)
    rows = [
        f"| term | {ran(reference)} | {ran(result)} | relative error |",
        "|---|---|---|---|",
        *(
            f"| {key} | {reference[key]:.6g} | {result[key]:.6g} | {errors[key]:.2e} |"
            for key in LOSS_KEYS
        ),
    ]
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    result = one_step(flags.FLAGS.config)
    Path(_OUT.value).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    if _REFERENCE.value is None:
        return
    reference = json.loads(Path(_REFERENCE.value).read_text())
    print(comparison_table(result, reference))
    error = relative_errors(result, reference)["loss"]
    verdict = "PASS" if error <= _RTOL.value else "FAIL"
    print(f"{verdict}: relative error of the loss {error:.2e} (limit {_RTOL.value:g})")
    if verdict == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    run_app(main)
