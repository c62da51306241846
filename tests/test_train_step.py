"""The compiled UniMedI step: runs for 2D-only, 3D-only and mixed batches; ablation flips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.pretrain import get_config
from unimedi_jax.models.text import BertConfig
from unimedi_jax.models.unimedi import build_unimedi, init_inputs
from unimedi_jax.train.state import (
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    weight_decay_mask,
)
from unimedi_jax.train.step import make_schedules, make_train_step

VOCAB = 50


def tiny_batch(config, modalities, seed=0):
    rng = np.random.default_rng(seed)
    length = config.text.max_length
    batch = {}
    if "image" in modalities:
        b = config.batch.size_2d
        batch["image"] = rng.random((b, *config.model.image_size), dtype=np.float32)
        batch["image_text_ids"] = rng.integers(1, VOCAB, (b, length), dtype=np.int32)
        batch["image_text_mask"] = np.ones((b, length), np.int32)
    if "volume" in modalities:
        b = config.batch.size_3d
        batch["volume"] = rng.random((b, *config.model.volume_size), dtype=np.float32)
        batch["volume_text_ids"] = rng.integers(1, VOCAB, (b, length), dtype=np.int32)
        batch["volume_text_mask"] = np.ones((b, length), np.int32)
    return batch


def build(config, total_steps=10):
    text = BertConfig.from_scratch(VOCAB, 32, 1, 4, 64, max_position_embeddings=32)
    model = build_unimedi(config, text, jnp.float32)
    lr = learning_rate_schedule(1e-3, 1e-8, 0.0, 2, total_steps)
    tx = make_optimizer(config.train, lr)
    variables = model.init(jax.random.key(0), *init_inputs(config))
    state = init_train_state(
        nn.unbox(variables["params"]), tx, config.model.dino_out_dim, jax.random.key(1)
    )
    step = jax.jit(make_train_step(model, tx, make_schedules(config, lr, total_steps, 2), config))
    return state, step


@pytest.mark.parametrize("modalities", [("image",), ("volume",), ("image", "volume")])
def test_step_runs_and_updates_everything(modalities):
    config = get_config("tiny")
    state, step = build(config)
    new_state, metrics = step(state, tiny_batch(config, modalities))
    for name in ("loss", "loss_vl", "loss_icl", "loss_pcl", "learning_rate", "grad_norm"):
        assert np.isfinite(metrics[name]), name
    np.testing.assert_allclose(
        metrics["loss"], metrics["loss_vl"] + metrics["loss_icl"] + metrics["loss_pcl"], rtol=1e-5
    )
    assert int(new_state.step) == 1
    # Student moved; the teacher moved by the EMA rule (1 - m) * (student - teacher).
    m = float(metrics["teacher_momentum"])
    old = state.teacher["vision"]["cls_token"]
    new_student = new_state.params["vision"]["cls_token"]
    np.testing.assert_allclose(
        new_state.teacher["vision"]["cls_token"], m * old + (1 - m) * new_student, atol=1e-6
    )
    assert not np.array_equal(new_student, state.params["vision"]["cls_token"])
    # Centers follow the teacher's logits (they start at zero).
    assert np.abs(new_state.center_cls).sum() > 0
    assert not np.array_equal(new_state.rng, state.rng)


def test_loss_falls_on_a_fixed_batch():
    config = get_config("tiny")
    state, step = build(config, total_steps=40)
    batch = tiny_batch(config, ("image", "volume"))
    first = None
    for _ in range(25):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss_vl"])
    assert float(metrics["loss_vl"]) < 0.5 * first


def test_vl_only_ablation_drops_distillation_terms():
    config = get_config("tiny")
    config.loss.self_distill = False
    config.selection.mode = "random"
    state, step = build(config)
    new_state, metrics = step(state, tiny_batch(config, ("image", "volume")))
    assert "loss_icl" not in metrics and "loss_pcl" not in metrics
    np.testing.assert_allclose(metrics["loss"], metrics["loss_vl"], rtol=1e-6)
    np.testing.assert_array_equal(new_state.center_cls, state.center_cls)


def test_weight_decay_mask_spares_biases_norms_and_embeddings():
    config = get_config("tiny")
    state, _ = build(config)
    mask = weight_decay_mask(state.params)
    assert mask["vision"]["encoder"]["blocks"]["fc1"]["kernel"]
    assert not mask["vision"]["encoder"]["blocks"]["fc1"]["bias"]
    assert not mask["vision"]["encoder"]["blocks"]["norm1"]["scale"]
    assert not mask["vision"]["embed_2d"]["pos_embed"]
    assert not mask["vision"]["cls_token"]
    assert not mask["logit_scale"]["value"]
    assert mask["dino_head"]["last_layer"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_report_embedding_pools_hidden_states_as_configured(pooling):
    config = get_config("tiny")
    config.text.pooling = pooling
    text = BertConfig.from_scratch(VOCAB, 32, 1, 4, 64, max_position_embeddings=32)
    model = build_unimedi(config, text, jnp.float32)
    params = nn.unbox(model.init(jax.random.key(0), *init_inputs(config))["params"])
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (3, 12), dtype=np.int32)
    mask = np.ones((3, 12), np.int32)
    mask[1, 7:] = mask[2, 4:] = 0  # padded reports
    hidden = np.asarray(
        model.apply({"params": params}, ids, mask, method=type(model).encode_text), np.float64
    )
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:  # the mean over each report's own tokens, padding left out
        pooled = np.stack(
            [h[m.astype(bool)].mean(axis=0) for h, m in zip(hidden, mask, strict=True)]
        )
    projected = pooled @ np.asarray(params["text_proj"]["Dense_0"]["kernel"], np.float64)
    expected = projected / np.linalg.norm(projected, axis=1, keepdims=True)
    found = model.apply({"params": params}, ids, mask, method=type(model).embed_text)
    np.testing.assert_allclose(found, expected, atol=1e-5)
