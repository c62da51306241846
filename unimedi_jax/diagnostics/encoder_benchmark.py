"""Compile and forward time of the ViT-B/16 encoder alone, on a 2D batch and a 3D+slices batch.

The library of ``python -m unimedi_jax.benchmark_encoder``: ``encoder_rows`` times both inputs
(median of ``repeats`` timed forward passes after one warm-up) at the paper's sizes.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from unimedi_jax.models.vit import VisionTransformer

HEADER = (
    "| input | batch | tokens | compile s | forward s (median) | samples/s |\n"
    "|---|---|---|---|---|---|"
)


def time_forward(
    model: VisionTransformer, params, inputs: tuple, repeats: int
) -> tuple[float, list]:
    """(compile seconds, forward seconds of each repeat) for a jitted forward pass."""
    fn = jax.jit(lambda p, *x: model.apply({"params": p}, *x).tokens)
    start = time.perf_counter()
    compiled = fn.lower(params, *inputs).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, *inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, *inputs))
        times.append(time.perf_counter() - start)
    return compile_s, times


def encoder_rows(batch_2d: int, batch_3d: int, k: int, repeats: int, dtype: str) -> list[str]:
    """One Markdown table row (``HEADER``'s columns) for 224x224 X-rays and for 32x128x128
    volumes with ``k`` selected slices, through a randomly initialised ViT-B/16."""
    model = VisionTransformer(dtype=jnp.dtype(dtype))
    images = jnp.zeros((batch_2d, 224, 224))
    volumes = jnp.zeros((batch_3d, 32, 128, 128))
    slices = jnp.zeros((batch_3d, k, 128, 128))

    def touch(m, x, v, s):
        return m(x), m(v, s)

    params = nn.unbox(
        jax.jit(nn.init(touch, model))(jax.random.key(0), images[:1], volumes[:1], slices[:1])[
            "params"
        ]
    )
    cases = [
        ("2D 224x224", (images,), batch_2d, 1 + 14 * 14),
        ("3D 32x128x128 + k slices", (volumes, slices), batch_3d, 1 + 512 + k * 64),
    ]
    rows = []
    for name, inputs, batch, tokens in cases:
        compile_s, times = time_forward(model, params, inputs, repeats)
        median = statistics.median(times)
        row = (name, batch, tokens, f"{compile_s:.1f}", f"{median:.3f}", f"{batch / median:.1f}")
        rows.append("| " + " | ".join(map(str, row)) + " |")
    return rows
