"""Heads on top of the towers: projections to the shared space and the DINO head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from unimedi_jax.models.layers import dense_init, zeros_init


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """x / max(||x||, eps) in float32 (as F.normalize): embeddings are compared by cosine."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


class Projection(nn.Module):
    """Linear map of a tower's [CLS] feature into the shared embedding, L2-normalised."""

    dim: int = 512
    dtype: jnp.dtype | type = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(
            self.dim,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=dense_init(("embed", None)),
        )(x)
        return l2_normalize(y)


class DINOHead(nn.Module):
    """DINO/iBOT head shared by [CLS] and patch tokens.

    3-layer MLP (GELU) -> bottleneck -> L2 norm -> weight-normalised linear layer without bias.
    The weight norm's gain is fixed at 1 (DINO's ``norm_last_layer=True``), so the last layer is
    just column-normalised weights: one parameter, no gain. Its cosines are computed in float32
    whatever ``dtype`` and at full float32 precision: divided by a teacher temperature of 0.04,
    bfloat16's rounding would move the logits by ~0.04, and TF32 (a GPU's default for float32
    matmuls, 10 bits of mantissa) by ~0.01.
    """

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 8192
    num_layers: int = 3
    dtype: jnp.dtype | type = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dims = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
        for i, dim in enumerate(dims):
            x = nn.Dense(
                dim,
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.truncated_normal(0.02),
                    ("embed", "mlp") if i == 0 else ("mlp", None),
                ),
                bias_init=zeros_init(("mlp",) if i == 0 else (None,)),
                name=f"mlp_{i}",
            )(x)
            if i < len(dims) - 1:
                x = nn.gelu(x, approximate=False)
        x = l2_normalize(x)
        direction = self.param(
            "last_layer",
            nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), ("mlp", "vocab")),
            (self.bottleneck_dim, self.out_dim),
        )
        weight = l2_normalize(direction, axis=0)
        return jnp.dot(x, weight, precision=jax.lax.Precision.HIGHEST)


class LogitScale(nn.Module):
    """CLIP's learnable log logit scale, initialised at log(1 / temperature).

    A module of its own (not a bare ``self.param`` on UniMedI) so that the teacher, which holds
    only the vision tower and DINO head, can run UniMedI's methods without this parameter.
    """

    init_temperature: float = 0.07

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param(
            "value",
            nn.with_logical_partitioning(
                nn.initializers.constant(math.log(1 / self.init_temperature)), ()
            ),
            (),
        )
