"""Losses and schedules of one UniMedI train step (paper Sec. 3.3-3.4, DESIGN "One train step").

L_vl is CLIP's symmetric InfoNCE between image and report [CLS] embeddings; L_icl and L_pcl are
the DINO loss on [CLS] and the iBOT loss on masked patch positions, with teacher centering and
temperature warm-up; the EMA teacher follows DINO's cosine momentum schedule. Pure jnp, float32,
jit-compatible: under jit with a sharded global batch, every mean here is a global mean.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any  # Any nested structure of arrays (e.g. Flax params).

_MASKED_LOGIT = -1e9  # Finite, so fully masked rows give no NaN in values or gradients.


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cap_logit_scale(logit_scale_param: jax.Array, max_logit_scale: float) -> jax.Array:
    """The log logit scale limited to log(max_logit_scale).

    The step applies it to the parameter after each update (CLIP clamps the same way): a cap on
    exp(param) alone has no gradient above the cap, so a parameter past it would stay there and
    pin the temperature at 1 / max_logit_scale. At the cap itself the gradient passes.
    """
    cap = math.log(max_logit_scale)
    return jnp.where(logit_scale_param > cap, cap, logit_scale_param)


def clip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale_param: jax.Array,
    max_logit_scale: float = 100.0,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over N image-report pairs (pair i is the positive of row/column i).

    Embeddings [N, E] must be L2-normalised. The learnable scale is exp(param) with the param
    capped at log(max_logit_scale) (``cap_logit_scale``), so the temperature cannot collapse.
    `valid` [N] bool drops padding pairs from both the negatives and the mean. Returns (loss,
    metrics) with top-1 accuracies 'i2t_acc', 't2i_acc' and the effective 'logit_scale'.
    """
    n = image_emb.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    scale = jnp.exp(cap_logit_scale(jnp.asarray(logit_scale_param, jnp.float32), max_logit_scale))
    logits = scale * (image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T)
    logits = jnp.where(valid[:, None] & valid[None, :], logits, _MASKED_LOGIT)

    weights = valid.astype(jnp.float32)
    loss_i2t = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    loss_t2i = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    loss = 0.5 * (_weighted_mean(loss_i2t, weights) + _weighted_mean(loss_t2i, weights))

    targets = jnp.arange(n)
    metrics = {
        "i2t_acc": _weighted_mean(jnp.argmax(logits, axis=1) == targets, weights),
        "t2i_acc": _weighted_mean(jnp.argmax(logits, axis=0) == targets, weights),
        "logit_scale": scale,
    }
    return loss, metrics


def grouped_clip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale_param: jax.Array,
    max_logit_scale: float = 100.0,
    group_sizes: tuple[int, ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``clip_loss`` over the whole batch, or, with ``group_sizes`` (consecutive runs of pairs,
    e.g. the X-rays then the CTs), within each group only: pairs of other groups are not
    negatives. The groups' losses are averaged weighted by size; the accuracies are of all pairs.
    """
    if group_sizes is None:
        return clip_loss(image_emb, text_emb, logit_scale_param, max_logit_scale)
    group_of = np.repeat(np.arange(len(group_sizes)), group_sizes)
    results = [
        clip_loss(image_emb, text_emb, logit_scale_param, max_logit_scale, valid=group_of == g)
        for g in range(len(group_sizes))
    ]
    weights = [n / sum(group_sizes) for n in group_sizes]
    loss = sum(w * loss for w, (loss, _) in zip(weights, results, strict=True))
    metrics = {
        name: sum(w * found[name] for w, (_, found) in zip(weights, results, strict=True))
        for name in ("i2t_acc", "t2i_acc")
    }
    return loss, {**metrics, "logit_scale": results[0][1]["logit_scale"]}


def _distill_cross_entropy(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    center: jax.Array,
    teacher_temp: jax.Array | float,
    student_temp: float,
) -> jax.Array:
    """Per-position -sum_k p_teacher * log p_student over the last axis; the teacher is a target."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    centered = (teacher_logits - jax.lax.stop_gradient(center.astype(jnp.float32))) / teacher_temp
    teacher_probs = jax.nn.softmax(centered, axis=-1)
    student_logprobs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, -1)
    return -jnp.sum(teacher_probs * student_logprobs, axis=-1)


def dino_cls_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    center: jax.Array,
    teacher_temp: jax.Array | float,
    student_temp: float = 0.1,
) -> jax.Array:
    """L_icl: DINO loss between the student's and the centred, sharpened teacher's [CLS] heads.

    student_logits, teacher_logits: [B, K]; center: [K]. Mean over samples.
    """
    return jnp.mean(
        _distill_cross_entropy(student_logits, teacher_logits, center, teacher_temp, student_temp)
    )


def ibot_patch_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    center: jax.Array,
    teacher_temp: jax.Array | float,
    student_temp: float = 0.1,
) -> jax.Array:
    """L_pcl: iBOT loss on the patch positions the student saw as [MASK].

    student_logits, teacher_logits: [B, P, K]; mask: [B, P] bool (True = masked); center: [K].
    Per sample, the sum over masked positions / max(count, 1); then the mean over samples.
    """
    per_position = _distill_cross_entropy(
        student_logits, teacher_logits, center, teacher_temp, student_temp
    )
    weights = mask.astype(jnp.float32)
    per_sample = jnp.sum(per_position * weights, axis=-1) / jnp.maximum(weights.sum(-1), 1.0)
    return jnp.mean(per_sample)


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
    teacher_params: object, student_params: object, momentum: jax.Array | float
) -> object:
    """New teacher tree m * teacher + (1 - m) * student, leaf by leaf, keeping teacher dtypes.

    Both trees must have the same structure; pass the student's matching subtree.
    """
    return jax.tree.map(
        lambda t, s: (momentum * t + (1.0 - momentum) * s).astype(t.dtype),
        teacher_params,
        student_params,
    )
