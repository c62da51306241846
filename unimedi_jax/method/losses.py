"""The losses of one UniMedI train step (paper Sec. 3.3-3.4, DESIGN "One train step").

L_vl is CLIP's symmetric InfoNCE between image and report [CLS] embeddings; L_icl and L_pcl are
the DINO loss on [CLS] and the iBOT loss on masked patch positions against the centred, sharpened
teacher (its EMA, centres and schedules: ``teacher``). Pure jnp, float32, jit-compatible: under
jit with a sharded global batch, every mean here is a global mean.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

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
