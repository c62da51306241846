"""Compile and forward time of the ViT encoder on a 2D batch and a 3D+slices batch.

    python -m unimedi_jax.benchmark_encoder [--batch_2d 8] [--batch_3d 2] [--repeats 5]

Prints a table (median of ``repeats`` timed forward passes after one warm-up); figures go to
docs/benchmarks.md with the machine and date. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from unimedi_jax.core.errors import exit_on_user_error
from unimedi_jax.models.vit import VisionTransformer


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


@exit_on_user_error()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_2d", type=int, default=8)
    parser.add_argument("--batch_3d", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="selected slices per volume")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    model = VisionTransformer(dtype=jnp.dtype(args.dtype))
    images = jnp.zeros((args.batch_2d, 224, 224))
    volumes = jnp.zeros((args.batch_3d, 32, 128, 128))
    slices = jnp.zeros((args.batch_3d, args.k, 128, 128))

    def touch(m, x, v, s):
        return m(x), m(v, s)

    params = nn.unbox(
        jax.jit(nn.init(touch, model))(jax.random.key(0), images[:1], volumes[:1], slices[:1])[
            "params"
        ]
    )
    print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})")
    print(f"ViT-B/16, dtype {args.dtype}, median of {args.repeats} runs")
    print("| input | batch | tokens | compile s | forward s (median) | samples/s |")
    print("|---|---|---|---|---|---|")
    cases = [
        ("2D 224x224", (images,), args.batch_2d, 1 + 14 * 14),
        ("3D 32x128x128 + k slices", (volumes, slices), args.batch_3d, 1 + 512 + args.k * 64),
    ]
    for name, inputs, batch, tokens in cases:
        compile_s, times = time_forward(model, params, inputs, args.repeats)
        median = statistics.median(times)
        row = (name, batch, tokens, f"{compile_s:.1f}", f"{median:.3f}", f"{batch / median:.1f}")
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
