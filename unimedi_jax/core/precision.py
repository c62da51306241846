"""Precision policy: parameters and optimizer state in float32, compute dtype from config."""

from __future__ import annotations

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")

# GPUs without fast bfloat16 matmuls (compute capability < 8.0: V100, T4 ...) compute in float32.
_BF16_MIN_CUDA_CAPABILITY = 8.0


def compute_dtype(name: str, device: jax.Device | None = None) -> jnp.dtype:
    """Resolves ``precision.compute_dtype`` (one of COMPUTE_DTYPES, checked in config/checks.py);
    'auto' picks bfloat16 on TPU and Ampere+ GPUs."""
    if name != "auto":
        return jnp.dtype(name)
    device = device or jax.devices()[0]
    if device.platform == "tpu":
        return jnp.dtype(jnp.bfloat16)
    if device.platform == "gpu":
        capability = float(getattr(device, "compute_capability", "0") or 0)
        if capability >= _BF16_MIN_CUDA_CAPABILITY:
            return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)
