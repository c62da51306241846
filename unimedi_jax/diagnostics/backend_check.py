"""One train step on this machine's default backend, and its losses against a reference run's.

The library of ``python -m unimedi_jax.device_check``. The initial state comes from the config's
seed (threefry draws the same numbers on every backend) and the batch is the step benchmark's
fixed random one, so two runs of one config differ only by the backend and the compute dtype: a
GPU step in bfloat16 must give the CPU's float32 loss within a tolerance.
"""

from __future__ import annotations

import jax

from unimedi_jax.core.precision import compute_dtype
from unimedi_jax.diagnostics.step_benchmark import (
    SCHEDULE_STEPS,
    SCHEDULE_WARMUP,
    checked_mesh_and_text,
    device_batch,
)
from unimedi_jax.trainers.pretraining import build_trainer

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


def loss_verdict(result: dict, reference: dict, rtol: float) -> tuple[bool, str]:
    """(whether the total loss is within ``rtol`` of the reference's, the line saying so)."""
    error = relative_errors(result, reference)["loss"]
    passed = error <= rtol
    verdict = "PASS" if passed else "FAIL"
    return passed, f"{verdict}: relative error of the loss {error:.2e} (limit {rtol:g})"
