"""The EMA teacher's updates, centres and schedules against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimedi_jax.method import teacher


def test_update_center_hand_computed():
    center = np.array([1.0, 0.0], np.float32)
    logits = np.array([[[2.0, 4.0], [0.0, 2.0]], [[4.0, 0.0], [2.0, 2.0]]], np.float32)
    # mean over (2, 2) leading positions = [2, 2]
    got = jax.jit(teacher.update_center)(center, logits, 0.9)
    np.testing.assert_allclose(got, [0.9 * 1 + 0.1 * 2, 0.1 * 2], rtol=1e-6)
    weights = np.array([[True, False], [True, False]])  # mean of [2, 4], [4, 0] = [3, 2]
    got = teacher.update_center(center, logits, 0.5, weights=weights)
    np.testing.assert_allclose(got, [0.5 * 1 + 0.5 * 3, 0.5 * 2], rtol=1e-6)
    unchanged = teacher.update_center(center, logits, 0.5, weights=np.zeros((2, 2), bool))
    np.testing.assert_allclose(unchanged, center)


def test_teacher_temperature_schedule():
    fn = jax.jit(teacher.teacher_temperature, static_argnums=1)
    assert float(fn(0, 10)) == pytest.approx(0.04)
    assert float(fn(5, 10)) == pytest.approx(0.055)
    assert float(fn(10, 10)) == pytest.approx(0.07)
    assert float(fn(1000, 10)) == pytest.approx(0.07)
    assert float(teacher.teacher_temperature(0, 0)) == pytest.approx(0.07)
    assert float(teacher.teacher_temperature(jnp.int32(3), 4, 0.1, 0.2)) == pytest.approx(0.175)


def test_teacher_momentum_schedule():
    fn = jax.jit(teacher.teacher_momentum, static_argnums=1)
    values = np.array([fn(s, 100) for s in range(0, 101, 5)])
    assert values[0] == pytest.approx(0.996)
    assert values[-1] == pytest.approx(1.0)
    assert float(fn(50, 100)) == pytest.approx(0.998)
    assert (np.diff(values) >= 0).all()
    assert float(fn(150, 100)) == pytest.approx(1.0)


def test_ema_update_hand_computed():
    old = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    student = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(0.0)}}
    got = jax.jit(teacher.ema_update)(old, student, 0.75)
    np.testing.assert_allclose(got["a"], [1.5, 1.5])
    np.testing.assert_allclose(got["b"]["c"], 3.0)
    assert jax.tree.structure(got) == jax.tree.structure(old)


def test_update_centers_weights_each_modality_by_its_patch_count():
    """[CLS]: the mean over all samples; patches: the mean over all patch positions of all
    modalities, though their sequences differ in length."""
    rng = np.random.default_rng(0)
    logits = {
        "image": rng.normal(size=(2, 1 + 3, 4)).astype(np.float32),
        "volume": rng.normal(size=(1, 1 + 5, 4)).astype(np.float32),
    }
    cls, patch = teacher.update_centers(
        logits, np.zeros(4, np.float32), np.ones(4, np.float32), 0.9
    )
    all_cls = np.concatenate([v[:, 0] for v in logits.values()])
    all_patches = np.concatenate([v[:, 1:].reshape(-1, 4) for v in logits.values()])
    np.testing.assert_allclose(cls, 0.1 * all_cls.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(patch, 0.9 + 0.1 * all_patches.mean(0), rtol=1e-5)
