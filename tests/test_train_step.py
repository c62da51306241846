"""The compiled UniMedI step: runs for 2D-only, 3D-only and mixed batches; ablation flips."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from scipy.special import logsumexp

from configs.pretrain import get_config
from tests.test_selection import _naive_slice_scores
from unimedi_jax.models import vit
from unimedi_jax.models.text import BertConfig
from unimedi_jax.models.unimedi import UniMedI, build_unimedi, init_inputs
from unimedi_jax.models.vit import PatchProjection
from unimedi_jax.train.state import (
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    teacher_subtree,
    weight_decay_mask,
)
from unimedi_jax.train.step import PretrainStep, make_schedules, make_train_step

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


def tiny_model(config):
    text = BertConfig.from_scratch(VOCAB, 32, 1, 4, 64, max_position_embeddings=32)
    return build_unimedi(config, text, jnp.float32)


def build(config, total_steps=10, lr=None):
    model = tiny_model(config)
    lr = lr or learning_rate_schedule(1e-3, 1e-8, 0.0, 2, total_steps)
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


def test_unmasked_tuning_shows_the_student_every_token_in_the_last_steps():
    """``masking.unmasked_tuning_fraction=0.3`` of 10 steps: steps 0-6 mask as configured, steps
    7-9 give exactly what a student without masking (``masking.ratio=0``) gives."""
    config = get_config("tiny")
    config.masking.unmasked_tuning_fraction = 0.3
    state, step = build(config, total_steps=10)
    unmasked = get_config("tiny")
    unmasked.masking.ratio = 0.0
    _, reference_step = build(unmasked, total_steps=10)
    batch = tiny_batch(config, ("image",))  # one path compiles faster; masking is per modality
    for at, masked in ((6, True), (7, False), (9, False)):
        here = state.replace(step=jnp.asarray(at, state.step.dtype))
        _, metrics = step(here, batch)
        _, reference = reference_step(here, batch)
        assert (metrics["loss_pcl"] > 0) == masked  # L_pcl averages over the masked patches
        for name in ("loss_vl", "loss_icl"):
            if masked:
                assert not np.isclose(metrics[name], reference[name], rtol=1e-4), (at, name)
            else:
                np.testing.assert_allclose(metrics[name], reference[name], rtol=1e-6)


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


def test_logit_scale_is_clamped_after_the_update_and_can_come_back_down():
    """Above the cap exp(p) is capped, so p gets no gradient and would stay there for good;
    the step clamps p to log(cap) after the update (as CLIP does), from where it can move."""
    config = get_config("tiny")
    state, step = build(config)
    cap = config.loss.max_logit_scale
    above = jnp.float32(np.log(cap) + 0.5)
    state = state.replace(params={**state.params, "logit_scale": {"value": above}})
    batch = tiny_batch(config, ("image", "volume"))
    state, metrics = step(state, batch)
    assert float(metrics["logit_scale"]) == pytest.approx(cap)
    assert float(state.params["logit_scale"]["value"]) == pytest.approx(np.log(cap), abs=1e-6)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert float(np.exp(state.params["logit_scale"]["value"])) < 0.999 * cap


def _np_keep_top(scores, ratio, parts):
    """Mask (True = masked): in each run of ``parts`` tokens, all but the round((1 - ratio) * n)
    highest scores, ties to the lower index."""
    mask = np.ones(scores.shape, bool)
    start = 0
    for n in parts:
        order = np.argsort(-scores[:, start : start + n], axis=1, kind="stable")
        for b, kept in enumerate(order[:, : round((1 - ratio) * n)]):
            mask[b, start + kept] = False
        start += n
    return mask


def _np_distill(student, teacher, center, teacher_temp, student_temp):
    """-sum_k p_teacher log p_student per position, with explicit softmaxes."""
    t = (teacher - center) / teacher_temp
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    s = student / student_temp
    return -np.sum(p * (s - logsumexp(s, axis=-1, keepdims=True)), axis=-1)


@pytest.mark.parametrize(
    "variant", ["defaults", "per_part+all_tokens+last_layer", "per_modality_masking_and_pcl"]
)
def test_teacher_not_student_selects_slices_masks_and_gives_unmasked_targets(variant):
    """With a teacher unlike the student (as after many EMA steps), slices and masks follow the
    teacher's Eq. 1 attention, the targets are the teacher's logits on the unmasked sequence, and
    L_icl, L_pcl and the centers match a reference built from separate model calls. Per
    modality: X-rays masked at their own ratio, L_pcl on the CTs' patches alone."""
    config = get_config("tiny")
    per_part = variant == "per_part+all_tokens+last_layer"
    if per_part:
        config.masking.per_part = True
        config.loss.pcl_tokens = "all"
        config.selection.layers = "last"
    ratios = {"image": config.masking.ratio, "volume": config.masking.ratio}
    if variant == "per_modality_masking_and_pcl":
        config.masking.image_ratio = ratios["image"] = 0.25
        config.loss.pcl_modalities = ("volume",)
    model = tiny_model(config)
    state, step = build(config)
    other = nn.unbox(model.init(jax.random.key(7), *init_inputs(config))["params"])
    state = state.replace(teacher=teacher_subtree(other))
    batch = tiny_batch(config, ("image", "volume"))
    new_state, metrics = step(state, batch)

    def run(params, x, slices=None, mask=None):
        out = model.apply({"params": params}, x, slices, mask, method=UniMedI.encode_vision)
        logits = model.apply({"params": params}, out.tokens, method=UniMedI.dino)
        return np.asarray(out.cls_attention, np.float64), np.asarray(logits, np.float64)

    volume, k = batch["volume"], config.selection.k
    grid = tuple(s // p for s, p in zip(volume.shape[1:], config.model.patch_3d, strict=True))

    def eq2_slices(params):
        scores = _naive_slice_scores(run(params, volume)[0], grid, volume.shape[1])
        return np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)

    chosen = eq2_slices(state.teacher)
    assert not np.array_equal(chosen, eq2_slices(state.params))  # the student would differ
    inputs = {
        "image": (batch["image"],),
        "volume": (volume, volume[np.arange(len(volume))[:, None], chosen]),
    }
    teacher_logits, masks, student_logits = {}, {}, {}
    for m, args in inputs.items():
        attention, teacher_logits[m] = run(state.teacher, *args)
        n3 = int(np.prod(grid)) if m == "volume" else attention.shape[1]
        parts = (n3, attention.shape[1] - n3) if per_part else (attention.shape[1],)
        masks[m] = _np_keep_top(attention, ratios[m], parts)
        student_attention = run(state.params, *args)[0]
        assert not np.array_equal(masks[m], _np_keep_top(student_attention, ratios[m], parts))
        student_logits[m] = run(state.params, *args, mask=masks[m])[1]

    temp, s_temp = config.loss.warmup_teacher_temp, config.loss.student_temp  # step 0
    cls = {m: (student_logits[m][:, 0], teacher_logits[m][:, 0]) for m in inputs}
    loss_icl = np.mean(
        _np_distill(
            np.concatenate([s for s, _ in cls.values()]),
            np.concatenate([t for _, t in cls.values()]),
            0.0,
            temp,
            s_temp,
        )
    )
    per_sample = []
    for m in (m for m in inputs if m in config.loss.pcl_modalities):
        ce = _np_distill(student_logits[m][:, 1:], teacher_logits[m][:, 1:], 0.0, temp, s_temp)
        weights = np.ones_like(masks[m]) if per_part else masks[m]
        per_sample.append((ce * weights).sum(1) / np.maximum(weights.sum(1), 1))
    loss_pcl = np.mean(np.concatenate(per_sample))
    np.testing.assert_allclose(metrics["loss_icl"], loss_icl, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss_pcl"], loss_pcl, rtol=1e-4)
    momentum = config.loss.center_momentum
    all_cls = np.concatenate([t for _, t in cls.values()])
    all_patches = np.concatenate(
        [teacher_logits[m][:, 1:].reshape(-1, all_cls.shape[1]) for m in inputs]
    )
    np.testing.assert_allclose(
        new_state.center_cls, (1 - momentum) * all_cls.mean(0), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new_state.center_patch, (1 - momentum) * all_patches.mean(0), rtol=1e-4, atol=1e-6
    )


def test_per_param_clipping_clips_each_parameter_and_each_scanned_layer():
    """``train.clip_mode=per_param``: DINO's clip_gradients, each parameter's gradient scaled to
    norm <= grad_clip_norm when above; a scanned leaf [depth, ...] holds depth parameters."""
    config = get_config("tiny")
    config.train.clip_mode = "per_param"
    config.train.grad_clip_norm = 1.0
    rng = np.random.default_rng(0)
    params = {
        "vision": {"encoder": {"blocks": {"fc1": {"kernel": rng.normal(size=(3, 4, 5))}}}},
        "dino_head": {"last_layer": rng.normal(size=(4, 6))},
        "logit_scale": {"value": np.float32(2.0)},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    grads["vision"]["encoder"]["blocks"]["fc1"]["kernel"] *= np.array([0.01, 1.0, 5.0])[
        :, None, None
    ]  # layer 0 under the cap, layers 1 and 2 over it
    grads["logit_scale"]["value"] = jnp.float32(0.3)  # under the cap

    def dino_clip(g, axes):
        norm = np.sqrt(np.sum(np.square(np.asarray(g, np.float64)), axis=axes, keepdims=True))
        coef = 1.0 / (norm + 1e-6)
        return np.where(coef < 1, g * coef, g)

    expected_grads = {
        "vision": {
            "encoder": {
                "blocks": {
                    "fc1": {
                        "kernel": dino_clip(
                            grads["vision"]["encoder"]["blocks"]["fc1"]["kernel"], (1, 2)
                        )
                    }
                }
            }
        },
        "dino_head": {"last_layer": dino_clip(grads["dino_head"]["last_layer"], None)},
        "logit_scale": {"value": np.asarray(grads["logit_scale"]["value"])},
    }
    train = config.train
    reference = optax.adamw(
        1e-3, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay, mask=weight_decay_mask
    )
    expected, _ = reference.update(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), expected_grads),
        reference.init(params),
        params,
    )
    tx = make_optimizer(train, optax.constant_schedule(1e-3))
    found, _ = tx.update(grads, tx.init(params), params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), found, expected
    )


LOSS_TERMS = ("loss", "loss_vl", "loss_icl", "loss_pcl")


def gradients_as_state() -> optax.GradientTransformation:
    """An optimizer that changes nothing and keeps the last gradients as its state: a jitted
    step hands back its exact gradients."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None, **_: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def losses_and_grads(config, step_class=PretrainStep):
    """One step's loss terms and gradients on both modalities, with a teacher unlike the
    student (as after many EMA steps); and the step's FLOPs as XLA counts them."""
    model = tiny_model(config)
    tx = gradients_as_state()
    params = nn.unbox(model.init(jax.random.key(0), *init_inputs(config))["params"])
    other = nn.unbox(model.init(jax.random.key(7), *init_inputs(config))["params"])
    state = init_train_state(params, tx, config.model.dino_out_dim, jax.random.key(1))
    state = state.replace(teacher=teacher_subtree(other))
    schedules = make_schedules(config, optax.constant_schedule(1e-3), 10, 2)
    step = jax.jit(step_class(model, tx, schedules, config))
    batch = tiny_batch(config, ("image", "volume"))
    new_state, metrics = step(state, batch)
    flops = step.lower(state, batch).cost_analysis()["flops"]
    return {k: float(metrics[k]) for k in LOSS_TERMS}, new_state.opt_state, flops


def assert_close_grads(grads, reference, rtol):
    """Every gradient entry within ``rtol`` of the reference's, relative to the largest
    gradient entry (gradients that are zero in exact arithmetic, such as the attention key bias's,
    are rounding noise of the others)."""
    scale = max(float(np.abs(r).max()) for r in jax.tree.leaves(reference))
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(reference), strict=True
    ):
        np.testing.assert_allclose(g, r, rtol=0, atol=rtol * scale, err_msg=str(path))


class StudentHeadOnEveryToken(PretrainStep):
    """The step as it was: the student's DINO head on every token, L_pcl weighting the masked
    positions (no positions passed on)."""

    def teacher_targets(self, *args):
        return super().teacher_targets(*args)._replace(pcl_positions={})


def reference_config():
    """The tiny config with XLA's attention, masked per part (the masked count is the sum of
    two)."""
    config = get_config("tiny")
    config.model.attention = "xla"
    config.masking.per_part = True
    return config


@pytest.fixture(scope="module")
def today():
    """The step's losses, gradients and FLOPs at ``reference_config``."""
    return losses_and_grads(reference_config())


def test_student_head_on_the_masked_tokens_equals_the_head_on_every_token(today):
    """``loss.pcl_tokens=masked``: the student's DINO head runs on [CLS] and the masked tokens
    only, with the losses and gradients of the head on every token (float32 on the CPU: the
    summation order alone differs, so 1e-6 of the loss, 1e-5 of the largest gradient) and fewer
    FLOPs."""
    terms, grads, flops = today
    ref_terms, ref_grads, ref_flops = losses_and_grads(reference_config(), StudentHeadOnEveryToken)
    for name in LOSS_TERMS:
        np.testing.assert_allclose(terms[name], ref_terms[name], rtol=1e-6, err_msg=name)
    assert_close_grads(grads, ref_grads, 1e-5)
    assert flops < ref_flops


def conv_tokenizers(next_fun, args, kwargs, context):
    """The tokenizers as they were: ``nn.Conv`` over the same parameters (once ``init`` has made
    them)."""
    module = context.module
    if not isinstance(module, PatchProjection) or not module.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)
    conv = nn.Conv(
        module.width, module.patch, strides=module.patch, padding="VALID", dtype=module.dtype
    )
    out = conv.apply({"params": module.variables["params"]}, *args)
    return out.reshape(out.shape[0], -1, module.width)


def test_tokenizers_as_matmuls_equal_the_convolutions(today):
    """Patch embedding as reshape + matmul: the losses and gradients of the step with the 1-channel
    convolutions over the same parameters (float32 on the CPU: 1e-6 of the loss, 1e-5 of the
    largest gradient)."""
    terms, grads, _ = today
    with nn.intercept_methods(conv_tokenizers):
        ref_terms, ref_grads, _ = losses_and_grads(reference_config())
    for name in LOSS_TERMS:
        np.testing.assert_allclose(terms[name], ref_terms[name], rtol=1e-6, err_msg=name)
    assert_close_grads(grads, ref_grads, 1e-5)


def attention_as_it_was(q, k, v, implementation, mask=None):
    """The vision tower's attention before ``model.attention``: jax's default implementation."""
    assert implementation == "xla" and mask is None
    return jax.nn.dot_product_attention(q, k, v)


def test_xla_attention_is_the_step_as_it_was_bit_for_bit(today, monkeypatch):
    """``model.attention=xla``: losses and gradients bit for bit those of the attention call the
    step made before the option. (The naive attention math agrees to rounding only, its HLO
    differing: test_vit.py holds the tower to it.)"""
    terms, grads, _ = today
    monkeypatch.setattr(vit, "dot_product_attention", attention_as_it_was)
    ref_terms, ref_grads, _ = losses_and_grads(reference_config())
    assert terms == ref_terms
    jax.tree.map(np.testing.assert_array_equal, grads, ref_grads)


def test_per_modality_masking_left_unset_is_the_shared_masking(today):
    """``masking.image_ratio`` / ``_mode`` and ``volume_*`` left unset (the preset) give the
    step of both set to ``masking.ratio`` / ``.mode``, bit for bit."""
    terms, grads, _ = today
    config = reference_config()
    for m in ("image", "volume"):
        config.masking[f"{m}_ratio"] = config.masking.ratio
        config.masking[f"{m}_mode"] = config.masking.mode
    explicit_terms, explicit_grads, _ = losses_and_grads(config)
    assert terms == explicit_terms
    jax.tree.map(np.testing.assert_array_equal, grads, explicit_grads)


def test_oracle_selection_trains_on_the_ground_truth_lesion_slices():
    """selection.mode=oracle: with the lesion slices where the teacher's Eq. 2 would look, the
    step is the attentive step; with other lesion slices it is another step."""
    config = get_config("tiny")
    state, attentive_step = build(config)
    batch = tiny_batch(config, ("volume",))
    volume, k = batch["volume"], config.selection.k
    model = tiny_model(config)
    attention = model.apply(
        {"params": state.teacher}, volume, method=UniMedI.encode_vision
    ).cls_attention
    grid = tuple(s // p for s, p in zip(volume.shape[1:], config.model.patch_3d, strict=True))
    scores = _naive_slice_scores(np.asarray(attention, np.float64), grid, volume.shape[1])
    chosen = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
    lesion = np.zeros(volume.shape[:2], bool)
    lesion[np.arange(len(volume))[:, None], chosen] = True

    oracle = get_config("tiny")
    oracle.selection.mode = "oracle"
    _, oracle_step = build(oracle)
    _, want = attentive_step(state, batch)
    _, got = oracle_step(state, {**batch, "lesion_slices": lesion})
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    _, other = oracle_step(state, {**batch, "lesion_slices": np.roll(lesion, 1, axis=1)})
    assert abs(float(other["loss"]) - float(want["loss"])) > 1e-4
