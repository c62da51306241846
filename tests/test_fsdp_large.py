"""ViT-L/16 + BERT-base under the mesh presets on 8 fake CPU devices: the rules cover every weight.

Real parameter shapes (only the inputs are small: 32x32 images, 4x32x32 volumes, 16 tokens):
the FSDP preset must split every parameter, EMA-teacher and Adam-moment array that has a
dimension divisible by 8 over 'fsdp', so a device holds 1/8 of the state, and one train step must
give a finite loss; the FSDP + tensor preset must split the attention and MLP kernels of both
towers over 'tensor'. It runs in a fresh interpreter (``XLA_FLAGS`` must be set before jax
starts). The float32 state (student, teacher, two Adam moments) is about 6 GB, the step's
temporaries about 4 GB more: this test needs about 11 GB of RAM and two minutes on 2 CPU cores.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from configs.pretrain import get_config
from tests.fake_devices import fake_device_flags
from unimedi_jax.core import sharding
from unimedi_jax.diagnostics.step_benchmark import device_batch, text_tower
from unimedi_jax.models.unimedi import build_unimedi, init_inputs
from unimedi_jax.trainers.pretraining import build_trainer

HERE = Path(__file__).resolve().parent
DEVICES = 8

# (vision block, text layer) parameter names of the same role, and their fsdp_tp PartitionSpec
# (leading None: the stacked-layers axis).
TENSOR_PARALLEL = {
    ("query", "query"): P(None, "fsdp", "tensor", None),
    ("key", "key"): P(None, "fsdp", "tensor", None),
    ("value", "value"): P(None, "fsdp", "tensor", None),
    ("out", "attention_output"): P(None, "tensor", None, "fsdp"),
    ("fc1", "intermediate"): P(None, "fsdp", "tensor"),
    ("fc2", "output"): P(None, "tensor", "fsdp"),
}


def large_config(preset: str):
    """ViT-L/16 + BERT-base (from scratch) with tiny inputs and one example per device."""
    config = get_config("vit_l16")
    config.model.update(image_size=(32, 32), volume_size=(4, 32, 32))
    config.text.update(path="", max_length=16)
    config.selection.k = 2
    config.batch.update(size_2d=DEVICES, size_3d=DEVICES)
    config.mesh.preset = preset
    return config


def mesh_axes(spec: P) -> set:
    return {a for dim in spec for a in ((dim,) if isinstance(dim, str) else dim or ())}


def check_fsdp_tp_splits_attention_and_mlp() -> None:
    """The abstract parameters' shardings under fsdp_tp (nothing is allocated)."""
    config = large_config("fsdp_tp")
    mesh = sharding.mesh_from_config(config.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}, mesh.shape
    model = build_unimedi(config, text_tower(config).config, jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), *init_inputs(config))["params"]
    specs = jax.tree.map(
        lambda s: s.spec, sharding.param_shardings(params, mesh, sharding.logical_axis_rules())
    )
    for names, want in TENSOR_PARALLEL.items():
        for layers, name in zip(
            (specs["vision"]["encoder"]["blocks"], specs["text"]["layers"]), names, strict=True
        ):
            assert layers[name]["kernel"] == want, (name, layers[name]["kernel"], want)


def check_fsdp_step() -> None:
    """Every divisible state array split over 'fsdp', 1/8 of the bytes per device, one step."""
    start = time.perf_counter()
    config = large_config("fsdp")
    mesh = sharding.mesh_from_config(config.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": DEVICES, "tensor": 1}, mesh.shape
    text = text_tower(config)
    trainer = build_trainer(config, text, mesh, total_steps=10, warmup_steps=2)
    state = jax.block_until_ready(trainer.state)
    init_s = time.perf_counter() - start

    whole, unsplit, on_device = 0, [], dict.fromkeys(mesh.devices.flat, 0)
    for part in ("params", "teacher", "opt_state"):
        flat = jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]
        for path, x in flat:
            whole += x.nbytes
            for shard in x.addressable_shards:
                on_device[shard.device] += shard.data.nbytes
            if any(d % DEVICES == 0 for d in x.shape) and "fsdp" not in mesh_axes(x.sharding.spec):
                unsplit.append(f"{part}{jax.tree_util.keystr(path)} {x.shape} {x.sharding.spec}")
    assert not unsplit, "not split over fsdp:\n" + "\n".join(unsplit)
    share = max(on_device.values()) / whole
    assert 1 / DEVICES <= share < 1.001 / DEVICES, share

    batch = device_batch(config, mesh, text)
    # Unoptimised CPU codegen for the step only: it builds in half the time and runs about as
    # fast, while the init's random draws run several times slower unoptimised.
    step = trainer.step.lower(state, batch).compile({"xla_backend_optimization_level": 0})
    state, metrics = step(state, batch)
    loss = float(metrics["loss"])
    assert np.isfinite(loss), metrics
    print(
        "FIGURES "
        + json.dumps(
            {
                "state_gb": whole / 1e9,
                "per_device_share": share,
                "loss": loss,
                "init_s": init_s,
                "init_and_step_s": time.perf_counter() - start,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
    )


def test_vit_l16_bert_base_under_fsdp_and_fsdp_tp_on_8_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": fake_device_flags(DEVICES),
        "JAX_PLATFORMS": "cpu",
        # Optimised code for the init's random draws of 6 GB (unoptimised, they take longer
        # than the step); the step itself compiles unoptimised (check_fsdp_step).
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "0",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    call = f"import {Path(__file__).stem} as t; t.check_fsdp_tp_splits_attention_and_mlp(); "
    call += "t.check_fsdp_step()"
    proc = subprocess.run(
        [sys.executable, "-c", call],
        env=env,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    print(next(line for line in proc.stdout.splitlines() if line.startswith("FIGURES ")))
