"""CLIP, DINO and iBOT losses against naive numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from unimedi_jax.method import losses


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _naive_clip(image, text, scale, valid):
    idx = [i for i in range(len(image)) if valid[i]]
    i2t, t2i = [], []
    for i in idx:
        row = [scale * float(image[i] @ text[j]) for j in idx]
        col = [scale * float(image[j] @ text[i]) for j in idx]
        pos = scale * float(image[i] @ text[i])
        i2t.append(logsumexp(row) - pos)
        t2i.append(logsumexp(col) - pos)
    return 0.5 * (np.mean(i2t) + np.mean(t2i))


def _naive_distill(student, teacher, center, t_temp, s_temp):
    """-sum p_t log p_s for one position, with explicit softmaxes."""
    t = (teacher - center) / t_temp
    p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
    s = student / s_temp
    log_p_s = s - logsumexp(s)
    return -float(np.sum(p_t * log_p_s))


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_clip_loss_matches_naive_reference():
    image, text = _unit(_rand(0, 5, 8)), _unit(_rand(1, 5, 8))
    param = math.log(1 / 0.07)
    loss, metrics = jax.jit(losses.clip_loss)(image, text, param)
    np.testing.assert_allclose(loss, _naive_clip(image, text, 1 / 0.07, [True] * 5), rtol=1e-5)
    logits = image @ text.T
    np.testing.assert_allclose(metrics["i2t_acc"], np.mean(logits.argmax(1) == np.arange(5)))
    np.testing.assert_allclose(metrics["t2i_acc"], np.mean(logits.argmax(0) == np.arange(5)))
    np.testing.assert_allclose(metrics["logit_scale"], 1 / 0.07, rtol=1e-6)


def test_clip_loss_valid_mask_drops_padding():
    image, text = _unit(_rand(2, 6, 4)), _unit(_rand(3, 6, 4))
    valid = np.array([True, False, True, True, False, True])
    loss, metrics = losses.clip_loss(image, text, 2.0, valid=valid)
    np.testing.assert_allclose(loss, _naive_clip(image, text, math.exp(2.0), valid), rtol=1e-5)
    sub_loss, sub_metrics = losses.clip_loss(image[valid], text[valid], 2.0)
    np.testing.assert_allclose(loss, sub_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["i2t_acc"], sub_metrics["i2t_acc"])


def test_grouped_clip_loss_contrasts_within_each_group_only():
    """X-rays (first 5) against X-ray reports, CTs (last 3) against CT reports: the naive loss
    of each group on its own, weighted by size; no group arguments = one joint softmax."""
    image, text = _unit(_rand(6, 8, 4)), _unit(_rand(7, 8, 4))
    in_group = [np.arange(8) < 5, np.arange(8) >= 5]
    loss, _ = jax.jit(losses.grouped_clip_loss, static_argnums=(3, 4))(
        image, text, 2.0, 100.0, (5, 3)
    )
    expected = sum(g.sum() / 8 * _naive_clip(image, text, math.exp(2.0), g) for g in in_group)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    joint, _ = losses.grouped_clip_loss(image, text, 2.0)
    np.testing.assert_allclose(
        joint, _naive_clip(image, text, math.exp(2.0), [True] * 8), rtol=1e-5
    )


def test_clip_perfect_alignment_accuracy():
    emb = np.eye(4, dtype=np.float32)
    _, metrics = losses.clip_loss(emb, emb, math.log(1 / 0.07))
    assert metrics["i2t_acc"] == 1.0 and metrics["t2i_acc"] == 1.0


def test_clip_logit_scale_cap_and_gradient():
    image, text = _unit(_rand(4, 4, 8)), _unit(_rand(5, 4, 8))
    _, metrics = losses.clip_loss(image, text, 10.0)
    assert float(metrics["logit_scale"]) == pytest.approx(100.0)
    capped = losses.clip_loss(image, text, 10.0)[0]
    np.testing.assert_allclose(capped, _naive_clip(image, text, 100.0, [True] * 4), rtol=1e-5)
    for param in (math.log(1 / 0.07), 10.0):
        grad = jax.jit(jax.grad(lambda p: losses.clip_loss(image, text, p)[0]))(jnp.float32(param))
        assert np.isfinite(grad)
    assert jax.grad(lambda p: losses.clip_loss(image, text, p)[0])(jnp.float32(1.0)) != 0.0


def test_clip_logit_scale_gradient_flows_at_the_cap():
    """The step clamps the parameter to log(cap) after each update; there the gradient must be
    the uncapped one, or the temperature could never come down from the cap."""
    image, text = _unit(_rand(4, 4, 8)), _unit(_rand(5, 4, 8))
    at_cap = jnp.float32(math.log(100.0))
    grad = jax.grad(lambda p: losses.clip_loss(image, text, p, 100.0)[0])(at_cap)
    eps = 1e-4  # central difference of the naive loss in the parameter p, scale = exp(p)
    up, down = (
        _naive_clip(image, text, math.exp(float(at_cap) + d), [True] * 4) for d in (eps, -eps)
    )
    np.testing.assert_allclose(grad, (up - down) / (2 * eps), rtol=1e-3)


def test_dino_cls_loss_matches_naive_reference():
    student, teacher, center = _rand(6, 3, 7), _rand(7, 3, 7), _rand(8, 7)
    got = jax.jit(losses.dino_cls_loss)(student, teacher, center, 0.05, 0.2)
    expected = np.mean(
        [_naive_distill(student[b], teacher[b], center, 0.05, 0.2) for b in range(3)]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    default = losses.dino_cls_loss(student, teacher, center, 0.04)
    expected = np.mean(
        [_naive_distill(student[b], teacher[b], center, 0.04, 0.1) for b in range(3)]
    )
    np.testing.assert_allclose(default, expected, rtol=1e-5)


def test_dino_gradient_flows_to_student_only():
    student, teacher, center = _rand(9, 2, 5), _rand(10, 2, 5), np.zeros(5, np.float32)
    g_student, g_teacher = jax.grad(losses.dino_cls_loss, argnums=(0, 1))(
        student, teacher, center, 0.04
    )
    assert np.abs(g_student).sum() > 0
    np.testing.assert_array_equal(g_teacher, 0.0)


def _naive_ibot(student, teacher, mask, center, t_temp, s_temp):
    per_sample = []
    for b in range(student.shape[0]):
        total = sum(
            _naive_distill(student[b, p], teacher[b, p], center, t_temp, s_temp)
            for p in range(student.shape[1])
            if mask[b, p]
        )
        per_sample.append(total / max(int(mask[b].sum()), 1))
    return np.mean(per_sample)


def test_ibot_patch_loss_matches_naive_reference():
    student, teacher, center = _rand(11, 3, 6, 5), _rand(12, 3, 6, 5), _rand(13, 5)
    mask = np.random.default_rng(14).random((3, 6)) < 0.5
    mask[2] = False  # a sample with nothing masked contributes 0
    got = jax.jit(losses.ibot_patch_loss)(student, teacher, mask, center, 0.06, 0.1)
    expected = _naive_ibot(student, teacher, mask, center, 0.06, 0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ibot_ignores_unmasked_positions():
    student, teacher, center = _rand(15, 2, 6, 5), _rand(16, 2, 6, 5), _rand(17, 5)
    mask = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], bool)
    base = losses.ibot_patch_loss(student, teacher, mask, center, 0.04)
    changed_t, changed_s = teacher.copy(), student.copy()
    changed_t[~mask] += 100.0 * _rand(18, int((~mask).sum()), 5)
    changed_s[~mask] -= 50.0
    np.testing.assert_allclose(
        losses.ibot_patch_loss(changed_s, changed_t, mask, center, 0.04), base, rtol=1e-6
    )
