"""The EMA teacher of self-distillation (paper Sec. 3.4; DINO, iBOT): how it and its targets move.

The teacher is an exponential moving average of the student whose momentum follows DINO's cosine
schedule; its softmax temperature warms up linearly; the centres subtracted from its logits are
EMAs of its mean outputs. The losses that use them live in ``losses``. Pure jnp, jit-compatible.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any  # Any nested structure of arrays (e.g. Flax params).


def teacher_temperature(
    step: jax.Array | int, warmup_steps: int, start: float = 0.04, end: float = 0.07
) -> jax.Array:
    """Teacher softmax temperature: linear from start to end over warmup_steps, then end.

    A low early temperature sharpens targets while the teacher is still weak (DINO).
    """
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.where(warmup_steps > 0, jnp.clip(step / jnp.maximum(warmup_steps, 1), 0.0, 1.0), 1.0)
    return start + (end - start) * frac


def teacher_momentum(
    step: jax.Array | int, total_steps: int, base: float = 0.996, final: float = 1.0
) -> jax.Array:
    """EMA momentum of the teacher: cosine from base at step 0 to final at total_steps (DINO)."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.maximum(total_steps, 1), 0.0, 1.0)
    return final - (final - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


def ema_update(
    teacher_params: PyTree, student_params: PyTree, momentum: jax.Array | float
) -> PyTree:
    """New teacher tree m * teacher + (1 - m) * student, leaf by leaf, keeping teacher dtypes.

    Both trees must have the same structure; pass the student's matching subtree.
    """
    return jax.tree.map(
        lambda t, s: (momentum * t + (1.0 - momentum) * s).astype(t.dtype),
        teacher_params,
        student_params,
    )


def update_center(
    center: jax.Array,
    teacher_logits: jax.Array,
    momentum: float = 0.9,
    weights: jax.Array | None = None,
) -> jax.Array:
    """EMA of the teacher's mean output, subtracted before its softmax to avoid collapse.

    teacher_logits: [..., K]; the batch mean runs over all leading axes (iBOT centres patches
    over all positions, not only masked ones). Optional `weights` [...] (e.g. a bool padding mask)
    turn it into a weighted mean; with zero total weight the center is left unchanged.
    """
    logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    logits = logits.reshape(-1, logits.shape[-1])
    center = center.astype(jnp.float32)
    if weights is None:
        batch_center = logits.mean(axis=0)
    else:
        w = weights.astype(jnp.float32).reshape(-1, 1)
        total = w.sum()
        batch_center = jnp.where(
            total > 0, jnp.sum(w * logits, axis=0) / jnp.maximum(total, 1e-12), center
        )
    return momentum * center + (1.0 - momentum) * batch_center


def update_centers(
    teacher_logits: dict[str, jax.Array],
    center_cls: jax.Array,
    center_patch: jax.Array,
    momentum: float,
) -> tuple[jax.Array, jax.Array]:
    """The [CLS] and patch centres after one step: EMAs of the teacher's mean [CLS] logits and
    mean patch logits over the global batch of every modality (logits [B, 1 + N, K] each)."""
    modalities = tuple(teacher_logits)
    center_cls = update_center(
        center_cls, jnp.concatenate([teacher_logits[m][:, 0] for m in modalities]), momentum
    )
    # Patch sequences differ in length per modality: average per modality, weight by count.
    patch_means = jnp.stack([teacher_logits[m][:, 1:].mean(axis=(0, 1)) for m in modalities])
    counts = jnp.asarray(
        [teacher_logits[m][:, 1:].shape[0] * teacher_logits[m][:, 1:].shape[1] for m in modalities],
        jnp.float32,
    )
    center_patch = update_center(center_patch, patch_means, momentum, weights=counts)
    return center_cls, center_patch
