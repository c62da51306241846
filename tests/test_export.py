"""PyTorch export: MONAI ViT/UNETR and HF BertModel load the files and match our towers; timm's
state dict is checked against an independent torch forward and against timm itself.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from flax import linen as nn
from monai.networks.nets import UNETR, ViT
from safetensors.torch import load_file

from configs.pretrain import get_config
from tests.tiny_models import TINY_BERT, TINY_VIT
from unimedi_jax.interop import torch_export
from unimedi_jax.models.text import BertConfig, BertEncoder
from unimedi_jax.models.vit import VisionTransformer
from unimedi_jax.text_tower.tokenizer import train_wordpiece_tokenizer
from unimedi_jax.torch_model import load_monai_weights

REPORTS = [
    "The heart size is normal.",
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Ground glass opacities in both lungs, peripheral predominance.",
]
HEAD = ["classification_head.0.weight", "classification_head.0.bias"]


def _random_params(init, *args, seed: int = 0):
    """Random values in the shape of ``init(*args)['params']``; norm scales near 1, the rest
    small and nonzero (biases too), so the role of every exported tensor is checked. Shapes come
    from eval_shape: compiling the real init costs far more than these tests.
    """
    shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(seed)
    flat = {
        path: (path[-1].key == "scale") + rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }
    return jax.tree_util.tree_map_with_path(lambda path, _: flat[path], shapes)


def _vision(**overrides):
    """A VisionTransformer and params of both tokenizers (linen builds only what is used)."""
    model = VisionTransformer(**{**TINY_VIT, **overrides})
    images = jnp.zeros((1, *model.image_size))
    volumes = jnp.zeros((1, *model.volume_size))
    return model, _random_params(nn.init(lambda m, x, v: (m(x), m(v)), model), images, volumes)


@pytest.fixture(scope="module")
def vision():
    return _vision()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    tokenizer = train_wordpiece_tokenizer(REPORTS, 60, tmp_path_factory.mktemp("tokenizer"))
    config = BertConfig(vocab_size=len(tokenizer), **TINY_BERT)
    model = BertEncoder(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = _random_params(model.init, ids, ids)
    return model, params, tokenizer


def _tokens(model, params, x) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, x).tokens)


def _assert_safe_files(out) -> None:
    """Only safetensors, JSON and the tokenizer's vocab.txt: nothing that unpickles."""
    suffixes = {path.suffix for path in out.iterdir()}
    assert suffixes <= {".safetensors", ".json", ".txt", ".md"}, suffixes
    assert (out / torch_export.WEIGHTS).is_file()
    json.loads((out / torch_export.CONFIG).read_text())


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ---------------------------------------------------------------------------------------------
# MONAI


def _monai_tokens(vit: ViT, volumes: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """(the final-norm tokens, as captured from vit.norm during forward; the head output)."""
    captured = []
    handle = vit.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        logits, _ = vit(torch.from_numpy(volumes)[:, None])
    handle.remove()
    return captured[0].numpy(), logits


@pytest.mark.parametrize("volume_size", [None, (8, 32, 32)])
def test_monai_vit_loads_all_but_head_and_matches(tmp_path, vision, volume_size):
    model, params = vision
    out = torch_export.export_monai(params, model, tmp_path, volume_size)
    _assert_safe_files(out)
    config = json.loads((out / torch_export.CONFIG).read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["monai_layer_norm_eps"] == 1e-5
    assert not config["unetr_compatible"]

    vit = ViT(**config["kwargs"], num_classes=3).eval()
    result = vit.load_state_dict(load_file(out / torch_export.WEIGHTS), strict=False)
    assert sorted(result.missing_keys) == sorted(HEAD)
    assert result.unexpected_keys == []

    size = volume_size or model.volume_size
    volumes = np.random.default_rng(0).random((2, *size), dtype=np.float32)
    ours = _tokens(model, params, volumes)
    # MONAI's own LayerNorm eps (1e-5, ours 1e-6) is not negligible: [CLS] enters the first
    # block with a tiny variance. Left at 1e-5 the error here is ~1e-3 on [CLS] and ~2e-4 on
    # the patches; load_monai_weights sets eps to ours, which leaves float32 rounding (~1e-6).
    assert sorted(load_monai_weights(vit, out)) == sorted(HEAD)
    theirs, logits = _monai_tokens(vit, volumes)
    assert logits.shape == (2, 3)
    assert _max_err(theirs, ours) < 1e-5


def test_unetr_vit_loads_all_but_cls_token_and_runs(tmp_path):
    # UNETR hard-codes 12 layers and 16x16x16 patches.
    model, params = _vision(
        width=16,
        depth=12,
        num_heads=2,
        mlp_dim=32,
        patch_2d=(16, 16),
        patch_3d=(16, 16, 16),
        image_size=(32, 32),
        volume_size=(16, 32, 32),
    )
    out = torch_export.export_monai(params, model, tmp_path)
    assert json.loads((out / torch_export.CONFIG).read_text())["unetr_compatible"]
    unetr = UNETR(
        in_channels=1,
        out_channels=2,
        img_size=model.volume_size,
        feature_size=4,
        hidden_size=16,
        mlp_dim=32,
        num_heads=2,
        qkv_bias=True,
    ).eval()
    result = unetr.vit.load_state_dict(load_file(out / torch_export.WEIGHTS), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["cls_token"]
    assert load_monai_weights(unetr.vit, out) == []

    volumes = np.random.default_rng(1).random((1, *model.volume_size), dtype=np.float32)
    x = torch.from_numpy(volumes)[:, None]
    with torch.no_grad():
        tokens, _ = unetr.vit(x)
        assert unetr(x).shape == (1, 2, *model.volume_size)
    # UNETR's ViT has no [CLS]: it equals our backbone run on the patch tokens alone.
    no_cls = model.apply({"params": params}, volumes, method=lambda m, v: m.encoder(m.embed_3d(v)))
    assert _max_err(tokens.numpy(), no_cls.tokens) < 2e-5  # float32 sums, any thread count


def test_load_monai_weights_rejects_a_vit_of_other_depth(tmp_path, vision):
    model, params = vision
    out = torch_export.export_monai(params, model, tmp_path)
    kwargs = {**json.loads((out / torch_export.CONFIG).read_text())["kwargs"], "num_layers": 3}
    with pytest.raises(ValueError, match="does not match the export"):
        load_monai_weights(ViT(**kwargs), out)


# ---------------------------------------------------------------------------------------------
# timm


def _timm_expected_shapes(kwargs) -> dict[str, tuple[int, ...]]:
    """timm VisionTransformer(class_token=True, num_classes=0, qkv_bias=True) parameters."""
    d, patch = kwargs["embed_dim"], kwargs["patch_size"]
    n = int(np.prod([s // p for s, p in zip(kwargs["img_size"], patch, strict=True)]))
    hidden = int(d * kwargs["mlp_ratio"])
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + n, d),
        "patch_embed.proj.weight": (d, kwargs["in_chans"], *patch),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(kwargs["depth"]):
        for name, shape in {
            "norm1.weight": (d,),
            "norm1.bias": (d,),
            "attn.qkv.weight": (3 * d, d),
            "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d),
            "attn.proj.bias": (d,),
            "norm2.weight": (d,),
            "norm2.bias": (d,),
            "mlp.fc1.weight": (hidden, d),
            "mlp.fc1.bias": (hidden,),
            "mlp.fc2.weight": (d, hidden),
            "mlp.fc2.bias": (d,),
        }.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def _timm_reference(state, images: torch.Tensor, num_heads: int) -> torch.Tensor:
    """timm's VisionTransformer.forward_features written out with torch.nn.functional."""
    d = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[2:]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], patch)
    x = x.flatten(2).transpose(1, 2)  # [B, N, D], row-major over the grid
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    b, n, _ = x.shape

    def ln(t, name):
        return F.layer_norm(t, (d,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def linear(t, name):
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        blk = f"blocks.{i}"
        qkv = linear(ln(x, f"{blk}.norm1"), f"{blk}.attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + linear(attended, f"{blk}.attn.proj")
        h = F.gelu(linear(ln(x, f"{blk}.norm2"), f"{blk}.mlp.fc1"))
        x = x + linear(h, f"{blk}.mlp.fc2")
    return ln(x, "norm")


@pytest.mark.parametrize(("in_chans", "image_size"), [(1, None), (3, None), (1, (48, 40))])
def test_timm_export_matches_reference_forward(tmp_path, vision, in_chans, image_size):
    model, params = vision
    out = torch_export.export_timm(params, model, tmp_path, image_size, in_chans)
    _assert_safe_files(out)
    config = json.loads((out / torch_export.CONFIG).read_text())
    state = load_file(out / torch_export.WEIGHTS)
    assert {k: tuple(v.shape) for k, v in state.items()} == _timm_expected_shapes(
        config["model_args"]
    )
    assert not state["pos_embed"][0, 0].any()  # our [CLS] has no position

    size = image_size or model.image_size
    images = np.random.default_rng(2).random((2, *size), dtype=np.float32)
    ours = _tokens(model, params, images)
    # A grey image replicated over the channels gives the single-channel features.
    grey = torch.from_numpy(images)[:, None].expand(-1, in_chans, -1, -1)
    with torch.no_grad():
        theirs = _timm_reference(state, grey, model.num_heads)
    assert _max_err(theirs, ours) < 1e-5


def test_timm_model_loads_export(tmp_path, vision):
    """timm itself builds the reference, loads the export strictly and from a local dir."""
    model, params = vision
    out = torch_export.export_timm(params, model, tmp_path, in_chans=3)
    config = json.loads((out / torch_export.CONFIG).read_text())
    reference = timm.models.vision_transformer.VisionTransformer(**config["model_args"]).eval()
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert expected == _timm_expected_shapes(config["model_args"])
    reference.load_state_dict(load_file(out / torch_export.WEIGHTS), strict=True)
    from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()

    images = np.random.default_rng(3).random((2, *model.image_size), dtype=np.float32)
    grey = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1)
    ours = _tokens(model, params, images)
    with torch.no_grad():
        for timm_model in (reference, from_dir):
            assert _max_err(timm_model.forward_features(grey), ours) < 1e-5
            assert _max_err(timm_model(grey), ours[:, 0]) < 1e-5


def test_timm_export_refuses_bad_sizes(vision):
    model, params = vision
    with pytest.raises(ValueError, match="not divisible by the patch"):
        torch_export.timm_vit_state(params, model, image_size=(36, 32))
    with pytest.raises(ValueError, match="not expressible"):
        torch_export.timm_vit_kwargs(VisionTransformer(**{**TINY_VIT, "width": 28, "mlp_dim": 61}))


# ---------------------------------------------------------------------------------------------
# Hugging Face BERT


def test_hf_bert_loads_without_pooler_and_matches(tmp_path, text):
    model, params, tokenizer = text
    out = torch_export.export_hf_bert(params, model.config, tmp_path, tokenizer)
    _assert_safe_files(out)

    hf, info = transformers.BertModel.from_pretrained(
        out, add_pooling_layer=False, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    _, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}

    rng = np.random.default_rng(4)
    ids = rng.integers(0, len(tokenizer), (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = hf.eval()(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state
    assert _max_err(theirs, ours) < 1e-4

    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded(REPORTS[0])["input_ids"] == tokenizer(REPORTS[0])["input_ids"]


# ---------------------------------------------------------------------------------------------
# A loaded run, as the command exports it


@pytest.mark.parametrize("fmt", ("monai", "timm", "hf_bert"))  # torch: tests/test_torch_model.py
def test_export_run_exports_the_loaded_run(tmp_path, monkeypatch, vision, text, fmt):
    model, params = vision
    text_model, text_params, tokenizer = text
    run = types.SimpleNamespace(
        model=types.SimpleNamespace(vision=model, text=text_model),
        params_for=lambda weights: {"vision": params, "text": text_params},
        tokenizer=tokenizer,
        config=get_config("tiny"),
        step=2,
    )
    fake = types.ModuleType("unimedi_jax.evaluation.trained_model")
    fake.load = lambda path: run if path == "runs/x" else None
    fake.resolve_run = lambda path: (Path(path), None)
    monkeypatch.setitem(sys.modules, "unimedi_jax.evaluation.trained_model", fake)
    size = {"monai": {"size": (8, 32, 32)}, "timm": {"size": (48, 48), "in_chans": 3}}
    torch_export.export_run("runs/x", fmt, tmp_path, **size.get(fmt, {}))
    _assert_safe_files(tmp_path)
    config = json.loads((tmp_path / torch_export.CONFIG).read_text())
    if fmt == "monai":
        assert config["kwargs"]["img_size"] == [8, 32, 32]
    elif fmt == "timm":
        assert config["model_args"]["img_size"] == [48, 48]
        assert config["model_args"]["in_chans"] == 3
    else:
        assert (tmp_path / "tokenizer.json").is_file()
    assert "step 2" in (tmp_path / torch_export.MODEL_CARD).read_text()
