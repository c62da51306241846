"""The dual-tokenizer ViT against a naive numpy transformer with explicit attention matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy.special import erf

from tests.tiny_models import TINY_VIT
from unimedi_jax.models import layers
from unimedi_jax.models.heads import DINOHead, Projection
from unimedi_jax.models.text import BertConfig, BertEncoder
from unimedi_jax.models.vit import Block, PatchProjection, VisionTransformer

TINY = {**TINY_VIT, "depth": 3}


def init_both(model, images, volumes, slices, seed=0):
    """Params for both tokenizers (linen builds a submodule's params only when it is used)."""

    def touch(m, x, v, s):
        return m(x), m(v, s)

    variables = nn.init(touch, model)(jax.random.key(seed), images, volumes, slices)
    return nn.unbox(variables["params"])


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    images = rng.random((2, 32, 32), dtype=np.float32)
    volumes = rng.random((2, 8, 16, 16), dtype=np.float32)
    slices = volumes[:, [1, 5]]
    model = VisionTransformer(**TINY)
    params = init_both(model, images, volumes, slices)
    # Random (not zero) biases and norms so the reference checks every parameter's role.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [
            leaf + 0.05 * jax.random.normal(k, leaf.shape)
            for leaf, k in zip(leaves, keys, strict=True)
        ],
    )
    return model, params, images, volumes, slices


def np_layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_patchify(x, patch, kernel, bias):
    """Standardised pixels, then patches by explicit loops over the grid, row-major: an
    independent tokenizer."""
    x = (x - TINY["pixel_mean"]) / TINY["pixel_std"]
    grid = [s // p for s, p in zip(x.shape[1:], patch, strict=True)]
    k = np.asarray(kernel).reshape(-1, kernel.shape[-1])
    tokens = []
    for idx in np.ndindex(*grid):
        sl = tuple(slice(i * p, (i + 1) * p) for i, p in zip(idx, patch, strict=True))
        tokens.append(x[(slice(None), *sl)].reshape(x.shape[0], -1) @ k + np.asarray(bias))
    return np.stack(tokens, axis=1)


def np_encoder(seq, enc, layers="all"):
    """Naive pre-LN encoder: explicit [B, H, N, N] attention; returns tokens and Eq. 1 (over
    all layers, or the last one's)."""
    blocks = enc["blocks"]
    depth = blocks["norm1"]["scale"].shape[0]
    eq1 = []
    x = seq
    for layer in range(depth):
        p = jax.tree.map(lambda a, i=layer: np.asarray(a[i]), blocks)
        h = np_layer_norm(x, p["norm1"])
        q, k, v = (
            np.einsum("bnd,dhc->bnhc", h, p[n]["kernel"]) + p[n]["bias"]
            for n in ("query", "key", "value")
        )
        c = q.shape[-1]
        logits = np.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(c)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        ctx = np.einsum("bhqk,bkhc->bqhc", attn, v)
        x = x + np.einsum("bqhc,hcd->bqd", ctx, p["out"]["kernel"]) + p["out"]["bias"]
        # Eq. 1 for this layer: [CLS] query over patch keys only, softmax over patches.
        cls_logits = logits[:, :, 0, 1:]
        cls_attn = np.exp(cls_logits - cls_logits.max(-1, keepdims=True))
        eq1.append((cls_attn / cls_attn.sum(-1, keepdims=True)).mean(1))
        h = np_layer_norm(x, p["norm2"])
        h = h @ p["fc1"]["kernel"] + p["fc1"]["bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = x + h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    return np_layer_norm(x, enc["norm"]), np.mean(eq1, axis=0) if layers == "all" else eq1[-1]


def np_vit(params, x, slices=None, mask=None, layers="all"):
    e2, e3 = params["embed_2d"], params["embed_3d"]
    if x.ndim == 3:
        tokens = np_patchify(x, (8, 8), e2["proj"]["kernel"], e2["proj"]["bias"])
        pos = np.asarray(e2["pos_embed"]).reshape(-1, 32)
    else:
        tokens = np_patchify(x, (2, 8, 8), e3["proj"]["kernel"], e3["proj"]["bias"])
        pos = np.asarray(e3["pos_embed"]).reshape(-1, 32)
        if slices is not None:
            # CT slices are 16x16: the 2D table (native 4x4 grid) resampled to 2x2.
            table = jax.image.resize(e2["pos_embed"], (2, 2, 32), "linear", antialias=False)
            for i in range(slices.shape[1]):
                tokens = np.concatenate(
                    [
                        tokens,
                        np_patchify(slices[:, i], (8, 8), e2["proj"]["kernel"], e2["proj"]["bias"]),
                    ],
                    axis=1,
                )
                pos = np.concatenate([pos, np.asarray(table).reshape(-1, 32)])
    if mask is not None:
        tokens = np.where(mask[..., None], np.asarray(params["mask_token"]), tokens)
    tokens = tokens + pos
    cls = np.broadcast_to(np.asarray(params["cls_token"]), (x.shape[0], 1, 32))
    return np_encoder(
        np.concatenate([cls, tokens], 1), jax.tree.map(np.asarray, params["encoder"]), layers
    )


@pytest.mark.parametrize("kind", ["image", "volume", "volume+slices", "masked image"])
def test_encoder_and_eq1_match_naive_reference(tiny, kind):
    model, params, images, volumes, slices = tiny
    mask = None
    if kind == "image":
        args = (images,)
    elif kind == "volume":
        args = (volumes,)
    elif kind == "volume+slices":
        args = (volumes, slices)
    else:
        mask = np.zeros((2, 16), bool)
        mask[0, [1, 4, 9]] = True
        mask[1, [0, 15]] = True
        args = (images,)
    out = model.apply({"params": params}, *args, mask=mask)
    ref_tokens, ref_eq1 = np_vit(params, *args, mask=mask)
    np.testing.assert_allclose(out.tokens, ref_tokens, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(out.cls_attention, ref_eq1, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.cls_attention).sum(-1), 1.0, atol=1e-5)


def test_eq1_of_the_last_layer_only(tiny):
    """``attention_layers='last'`` (A-CLIP's choice): the last block's [CLS] attention, not the
    mean over blocks; the tokens are unchanged."""
    _, params, _, volumes, slices = tiny
    out = VisionTransformer(**TINY, attention_layers="last").apply(
        {"params": params}, volumes, slices
    )
    ref_tokens, ref_last = np_vit(params, volumes, slices, layers="last")
    np.testing.assert_allclose(out.tokens, ref_tokens, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(out.cls_attention, ref_last, atol=1e-5, rtol=1e-4)
    assert not np.allclose(ref_last, np_vit(params, volumes, slices)[1], atol=1e-3)
    # An unknown name is a config error: tests/test_config_checks.py (selection.layers).


def test_volume_sequence_has_cls_3d_and_slice_tokens(tiny):
    model, params, _, volumes, slices = tiny
    out = model.apply({"params": params}, volumes, slices)
    n3 = (8 // 2) * (16 // 8) * (16 // 8)
    n_slice = (16 // 8) * (16 // 8)
    assert out.tokens.shape == (2, 1 + n3 + 2 * n_slice, 32)
    assert out.cls_attention.shape == (2, n3 + 2 * n_slice)


def test_masked_positions_receive_mask_embedding(tiny):
    model, params, images, _, _ = tiny
    mask = np.zeros((2, 16), bool)
    mask[:, 3] = True
    seq = model.apply({"params": params}, images, mask=mask, method="embed")
    pos = np.asarray(params["embed_2d"]["pos_embed"]).reshape(16, 32)
    # Sequence position 4 is patch 3 (after [CLS]): [MASK] + its position, whatever the pixels.
    expected = np.asarray(params["mask_token"]) + pos[3]
    np.testing.assert_allclose(seq[:, 4], np.broadcast_to(expected, (2, 32)), atol=1e-6)
    unmasked = model.apply({"params": params}, images, method="embed")
    assert not np.allclose(unmasked[:, 4], seq[:, 4])
    np.testing.assert_array_equal(unmasked[:, 5], seq[:, 5])
    # Fully masked, two different images give the same output: no pixel leaks through.
    full = np.ones((2, 16), bool)
    out_a = model.apply({"params": params}, images, mask=full)
    out_b = model.apply({"params": params}, images[::-1], mask=full)
    np.testing.assert_allclose(out_a.tokens, out_b.tokens, atol=1e-6)


def test_position_resampling_keeps_native_grid_and_resamples_others(tiny):
    model, params, _, _, _ = tiny
    native = model.apply({"params": params}, (4, 4), method=lambda m, g: m.embed_2d.position(g))
    np.testing.assert_array_equal(
        native, np.asarray(params["embed_2d"]["pos_embed"]).reshape(16, 32)
    )
    # Upsampling 4x4 -> 7x7 with half-pixel centres: the corner is the table's corner and
    # the centre is the mean of the four central entries (hand-computed bilinear case).
    table = np.asarray(params["embed_2d"]["pos_embed"])
    up = model.apply({"params": params}, (8, 8), method=lambda m, g: m.embed_2d.position(g))
    up = np.asarray(up).reshape(8, 8, 32)
    np.testing.assert_allclose(up[0, 0], table[0, 0], atol=1e-6)
    # Output pixel 3 of 8 maps to input coordinate (3.5) * 4/8 - 0.5 = 1.25 along each axis.
    w = np.array([0.75, 0.25])
    expected = np.einsum("i,j,ijd->d", w, w, table[1:3, 1:3])
    np.testing.assert_allclose(up[3, 3], expected, atol=1e-6)


def test_patch_size_mismatch_is_a_clear_error(tiny):
    model, params, _, _, _ = tiny
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model.apply({"params": params}, np.zeros((1, 30, 32), np.float32))


def test_vit_b16_parameter_count():
    """Shared backbone + 2D tokenizer of ViT-B/16 ~ 86M (timm's vit_base_patch16_224 sans head)."""
    model = VisionTransformer()
    shapes = jax.eval_shape(
        lambda: init_both(
            model,
            jnp.zeros((1, 224, 224)),
            jnp.zeros((1, 32, 128, 128)),
            jnp.zeros((1, 1, 128, 128)),
        )
    )
    count = sum(x.size for x in jax.tree.leaves(shapes))
    count -= sum(x.size for x in jax.tree.leaves(shapes["embed_3d"]))
    assert abs(count - 86e6) / 86e6 < 0.01, count


def test_scan_stacks_layers_and_names_partitions():
    model = VisionTransformer(**TINY)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32)))
    spec = nn.get_partition_spec(variables)["params"]
    assert spec["encoder"]["blocks"]["query"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "kv"
    )
    assert variables["params"]["encoder"]["blocks"]["fc1"]["kernel"].value.shape == (3, 32, 64)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_does_not_change_outputs(tiny, remat):
    _, params, images, _, _ = tiny
    base = VisionTransformer(**TINY).apply({"params": params}, images)
    out = VisionTransformer(**TINY, remat=remat).apply({"params": params}, images)
    np.testing.assert_allclose(out.tokens, base.tokens, atol=1e-6)


def test_projection_is_unit_norm_and_dino_head_shapes():
    x = jax.random.normal(jax.random.key(0), (3, 5, 32))
    proj = Projection(dim=16)
    y = proj.apply(proj.init(jax.random.key(1), x[:, 0]), x[:, 0])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, atol=1e-5)
    head = DINOHead(hidden_dim=24, bottleneck_dim=8, out_dim=40)
    params = nn.unbox(head.init(jax.random.key(2), x)["params"])
    logits = head.apply({"params": params}, x)
    assert logits.shape == (3, 5, 40)
    # Reference: MLP -> L2 norm -> column-normalised last layer (weight norm with gain 1).
    h = np.asarray(x)
    for i in range(3):
        h = h @ params[f"mlp_{i}"]["kernel"] + params[f"mlp_{i}"]["bias"]
        if i < 2:
            h = np.asarray(jax.nn.gelu(h, approximate=False))
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    w = np.asarray(params["last_layer"])
    np.testing.assert_allclose(logits, h @ (w / np.linalg.norm(w, axis=0)), atol=1e-5)


def test_dino_head_last_layer_cosines_in_float32_under_bfloat16():
    """Under bfloat16 the MLP runs in bfloat16, but the last layer's cosines (divided by a
    teacher temperature of 0.04) are computed in float32: bfloat16 would err by ~0.002."""
    x = jax.random.normal(jax.random.key(0), (4, 6, 32))
    head = DINOHead(hidden_dim=64, bottleneck_dim=32, out_dim=128, dtype=jnp.bfloat16)
    params = nn.unbox(head.init(jax.random.key(1), x)["params"])
    logits, state = head.apply({"params": params}, x, capture_intermediates=True)
    assert logits.dtype == jnp.float32
    bottleneck = np.asarray(state["intermediates"]["mlp_2"]["__call__"][0], np.float64)
    h = bottleneck / np.linalg.norm(bottleneck, axis=-1, keepdims=True)
    w = np.asarray(params["last_layer"], np.float64)
    np.testing.assert_allclose(logits, h @ (w / np.linalg.norm(w, axis=0)), atol=2e-5)


@pytest.mark.parametrize("patch", [(8, 8), (2, 8, 8)])
def test_patch_projection_takes_the_convolutions_parameters(patch):
    """The tokenizers' reshape + matmul has the 1-channel convolution's parameters (names,
    shapes, init values), so checkpoints of either load, and its output within float32 rounding
    (1e-5 of the largest token entry) on random parameters."""
    spatial = (16, 16) if len(patch) == 2 else (4, 16, 16)
    x = jax.random.uniform(jax.random.key(0), (3, *spatial, 1))
    conv = nn.Conv(32, patch, strides=patch, padding="VALID")
    conv_params = nn.unbox(conv.init(jax.random.key(1), x))
    ours = PatchProjection(32, patch)
    params = nn.unbox(ours.init(jax.random.key(1), x))
    jax.tree.map(np.testing.assert_array_equal, params, conv_params)
    random = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), conv_params)
    expected = conv.apply(random, x).reshape(3, -1, 32)
    got = ours.apply(random, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_eq1_is_the_cls_row_of_the_full_attention():
    """The block's Eq. 1, computed from q_cls and K alone, is the [CLS] row of the full softmax
    attention matrix over patch keys (renormalised without the [CLS] key), averaged over heads."""
    x = jax.random.normal(jax.random.key(0), (2, 1 + 12, 32))
    block = Block(32, 4, 64)
    params = nn.unbox(block.init(jax.random.key(1), x)["params"])
    _, eq1 = block.apply({"params": params}, x)
    h = np_layer_norm(np.asarray(x, np.float64), params["norm1"])
    q, k = (
        np.einsum("bnd,dhc->bnhc", h, params[n]["kernel"]) + params[n]["bias"]
        for n in ("query", "key")
    )
    logits = np.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(q.shape[-1])
    full = np.exp(logits - logits.max(-1, keepdims=True))
    full /= full.sum(-1, keepdims=True)  # [B, heads, 13, 13]
    row = full[:, :, 0, 1:]
    np.testing.assert_allclose(eq1, (row / row.sum(-1, keepdims=True)).mean(1), atol=1e-6)


def test_attention_auto_picks_cudnn_on_gpus_in_half_precision(monkeypatch):
    """``model.attention=auto``: cuDNN's flash kernel on a GPU with bfloat16 or float16 inputs,
    XLA for float32 and on other backends; a named implementation stays as named."""
    for backend, dtype, expected in (
        ("gpu", jnp.bfloat16, "cudnn"),
        ("gpu", jnp.float16, "cudnn"),
        ("gpu", jnp.float32, "xla"),
        ("cpu", jnp.bfloat16, "xla"),
        ("tpu", jnp.bfloat16, "xla"),
    ):
        monkeypatch.setattr(layers.jax, "default_backend", lambda b=backend: b)
        assert layers.attention_implementation("auto", dtype) == expected, (backend, dtype)
        assert layers.attention_implementation("xla", dtype) == "xla"
        assert layers.attention_implementation("cudnn", dtype) == "cudnn"


def test_dino_head_last_layer_is_a_full_precision_matmul():
    """The float32 last layer asks for full precision, so a GPU does not run it in TF32 (a CPU
    computes float32 matmuls in full precision anyway: what the lowered head asks for is what
    can be checked here)."""
    x = jax.random.normal(jax.random.key(0), (4, 6, 32))
    head = DINOHead(hidden_dim=64, bottleneck_dim=32, out_dim=128, dtype=jnp.bfloat16)
    params = nn.unbox(head.init(jax.random.key(1), x)["params"])
    jaxpr = jax.make_jaxpr(lambda p: head.apply({"params": p}, x))(params)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    last = [e for e in dots if e.outvars[0].aval.shape[-1] == 128]
    assert len(last) == 1 and last[0].outvars[0].aval.dtype == jnp.float32
    assert last[0].params["precision"] == (jax.lax.Precision.HIGHEST,) * 2
    assert all(e.params["precision"] is None for e in dots if e not in last)


def relative_error(got, expected) -> float:
    """||got - expected|| / ||expected|| over every leaf of two trees, in float64."""
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
    diff = ref = 0.0
    for g, e in pairs:
        g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
        diff, ref = diff + np.sum((g - e) ** 2), ref + np.sum(e**2)
    return float(np.sqrt(diff / ref))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_agrees_with_xla_in_bfloat16():
    """On a GPU in bfloat16 (launch/device_check.sh runs it): cuDNN's flash attention against
    XLA's, a ViT-B-like tower (head dim 64) on a CT sequence and the text tower on padded
    reports. Both round differently in bfloat16 (8-bit mantissa, ~4e-3 per operation), so the
    bound is 2e-2 on the outputs and 5e-2 on the gradients, relative, by the norm."""
    vit_kwargs = dict(TINY_VIT, width=128, num_heads=2, mlp_dim=256, dtype=jnp.bfloat16)
    volumes = jax.random.uniform(jax.random.key(0), (2, 8, 16, 16))
    slices = volumes[:, :2]
    model = VisionTransformer(**vit_kwargs, attention="xla")
    params = init_both(model, volumes[:, 0], volumes, slices)

    def vit_loss(params, attention):
        out = VisionTransformer(**vit_kwargs, attention=attention).apply(
            {"params": params}, volumes, slices
        )
        return jnp.sum(out.tokens.astype(jnp.float32) ** 2), out.tokens

    bert = BertConfig.from_scratch(100, 128, 2, 2, 256, max_position_embeddings=64)
    ids = jax.random.randint(jax.random.key(3), (3, 48), 1, 100)
    mask = (jnp.arange(48)[None] < jnp.array([[48], [30], [7]])).astype(jnp.int32)
    text = BertEncoder(bert, jnp.bfloat16, attention="xla")
    text_params = text.init(jax.random.key(4), ids, mask)["params"]

    def text_loss(params, attention):
        hidden = BertEncoder(bert, jnp.bfloat16, attention=attention).apply(
            {"params": params}, ids, mask
        )
        return jnp.sum((hidden * mask[..., None]) ** 2), hidden

    for loss, p in ((vit_loss, params), (text_loss, text_params)):
        results = {
            name: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(p, name)
            for name in ("xla", "cudnn")
        }
        (_, out_cudnn), grads_cudnn = results["cudnn"]
        (_, out_xla), grads_xla = results["xla"]
        assert relative_error(out_cudnn, out_xla) < 2e-2
        assert relative_error(grads_cudnn, grads_xla) < 5e-2
