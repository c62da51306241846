"""PyTorch export: the whole model for ``unimedi_jax.torch_model``, the 3D path for MONAI's
ViT/UNETR, the 2D path for timm, the text tower for HF.

The library of ``python -m unimedi_jax.export``. It lives apart from ``models/`` because it
writes files and speaks other frameworks' names; models stay pure flax. Every format is a
directory holding ``model.safetensors`` (float32, written by safetensors.numpy,
so exporting needs neither torch nor pickle), ``config.json`` (the constructor arguments) and a
``README.md`` model card (what it holds, training data and config, the exported step's figures,
the preprocessing, the loading recipe). The exported networks reproduce our features: MONAI's
ViT and timm's VisionTransformer return the final-norm tokens of
``VisionTransformer.apply(params, x).tokens`` (volumes without slices, images), transformers'
BertModel returns the text tower's last hidden states, and ``torch_model.load`` of the torch
format gives the embeddings of ``inference.load(run)``. Loading the files needs
``pip install torch safetensors`` plus transformers, monai or timm.

    python -m unimedi_jax.export --workdir=runs/demo --format=torch --out=export/torch

or ``export_run(workdir, "torch", out)`` from Python.

Recipes (``state = safetensors.torch.load_file(out / "model.safetensors")``):

- torch: ``model = unimedi_jax.torch_model.load(out)``; ``model.encode_image``,
  ``encode_volume`` (with the attentive slice selection), ``encode_text``, ``logit_scale``.
  ``text/`` is the text tower as an hf_bert export; ``config.json`` states the preprocessing.
- monai: ``vit = monai.networks.nets.ViT(**config["kwargs"], num_classes=C)`` then
  ``unimedi_jax.torch_model.load_monai_weights(vit, out)``. MONAI builds its LayerNorms with
  torch's eps 1e-5 and exposes no argument for it; ours is 1e-6, and eps is not in a state dict,
  so the loader sets it (left at 1e-5, [CLS] is off by ~1e-3: it enters the first block with a
  tiny variance). For UNETR (needs depth 12 and patch 16x16x16):
  ``load_monai_weights(unetr.vit, out)``. UNETR's ViT has no class token, so its tokens see no
  [CLS] and differ from ours.
- timm: ``timm.create_model(f"local-dir:{out}", pretrained=True)`` or
  ``VisionTransformer(**config["model_args"]).load_state_dict(state)``.
- hf_bert: ``BertModel.from_pretrained(out, add_pooling_layer=False)`` (there is no pooler; with
  the default the pooler alone is freshly initialised) and ``AutoTokenizer.from_pretrained(out)``.
  The run's ``text.pooling`` says which feature of ``last_hidden_state`` it trained: [CLS]
  (``[:, 0]``) or the mean over the attention mask.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import safetensors.numpy
from flax import linen as nn

from unimedi_jax.core.errors import UserError
from unimedi_jax.core.run_folders import check_output, written_atomically
from unimedi_jax.evaluation.checkpoint_results import result_of_step
from unimedi_jax.interop.formats import (
    CONFIG,
    LAYER_NORM_EPS,
    MODEL_CARD,
    MONAI_LAYER_NORM_EPS,
    TEXT_DIR,
    WEIGHTS,
)
from unimedi_jax.models.text import BertConfig
from unimedi_jax.models.vit import VisionTransformer, resample_grid, token_grid
from unimedi_jax.text_tower.hugging_face import EMBEDDING_SOURCES, FILE_LEAVES, LAYER_SOURCES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS = ("torch", "monai", "timm", "hf_bert")

Tensors = dict[str, np.ndarray]


class ExportError(UserError, ValueError):
    """An export asked for with flags that do not fit its format."""


# Our block's sub-modules -> each library's names for them.
_MONAI_BLOCK = {
    "norm1": "norm1",
    "qkv": "attn.qkv",
    "out": "attn.out_proj",
    "norm2": "norm2",
    "fc1": "mlp.linear1",
    "fc2": "mlp.linear2",
}
_TIMM_BLOCK = {
    "norm1": "norm1",
    "qkv": "attn.qkv",
    "out": "attn.proj",
    "norm2": "norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def _host(params: Mapping[str, Any]) -> dict[str, Any]:
    """A (possibly boxed, device-resident) param tree as float32 numpy arrays."""
    return jax.tree.map(lambda a: np.asarray(a, np.float32), nn.unbox(params))


def _linear(p: Mapping[str, np.ndarray]) -> Tensors:
    """Dense/DenseGeneral {kernel [*in, *out], bias [*out]} -> torch Linear {weight [out, in]}."""
    bias = p["bias"].reshape(-1)
    return {"weight": p["kernel"].reshape(-1, bias.size).T, "bias": bias}


def _norm(p: Mapping[str, np.ndarray]) -> Tensors:
    return {"weight": p["scale"], "bias": p["bias"]}


def _block(p: Mapping[str, Any]) -> dict[str, Tensors]:
    """One block's torch tensors; qkv is fused as [q; k; v] rows, each heads-major.

    MONAI's SABlock rearranges the fused output with "b h (qkv l d) -> qkv b l h d" and timm's
    Attention with reshape(B, N, 3, heads, head_dim): the same row order for both.
    """
    q, k, v = (_linear(p[name]) for name in ("query", "key", "value"))
    return {
        "norm1": _norm(p["norm1"]),
        "qkv": {leaf: np.concatenate([q[leaf], k[leaf], v[leaf]]) for leaf in ("weight", "bias")},
        "out": _linear(p["out"]),
        "norm2": _norm(p["norm2"]),
        "fc1": _linear(p["fc1"]),
        "fc2": _linear(p["fc2"]),
    }


def _backbone(encoder: Mapping[str, Any], names: Mapping[str, str]) -> Tensors:
    """The shared blocks (scanned: stacked on axis 0) and the final norm, under ``names``."""
    blocks = encoder["blocks"]
    tensors = {}
    for i in range(blocks["norm1"]["scale"].shape[0]):
        layer = jax.tree.map(lambda a, i=i: a[i], blocks)
        for ours, module in _block(layer).items():
            for leaf, value in module.items():
                tensors[f"blocks.{i}.{names[ours]}.{leaf}"] = value
    tensors.update({f"norm.{leaf}": value for leaf, value in _norm(encoder["norm"]).items()})
    return tensors


def _conv_weight(kernel: np.ndarray) -> np.ndarray:
    """Flax conv kernel [*patch, C, D] -> torch ConvNd weight [D, C, *patch]."""
    rank = kernel.ndim - 2
    return kernel.transpose(rank + 1, rank, *range(rank))


def _projection(embed: Mapping[str, Any], vision: VisionTransformer) -> tuple[np.ndarray, ...]:
    """Torch conv weight and bias of a tokenizer with its input standardisation folded in.

    conv(W, (x - m) / s) + b = conv(W / s, x) + b - (m / s) * sum(W), so the exported model
    takes the same [0, 1] inputs as ours and needs no preprocessing layer.
    """
    kernel, bias = embed["proj"]["kernel"], embed["proj"]["bias"]
    scale = 1.0 / vision.pixel_std
    folded_bias = bias - vision.pixel_mean * scale * kernel.sum(axis=tuple(range(kernel.ndim - 1)))
    return _conv_weight(kernel * scale), folded_bias.astype(np.float32)


def _positions(embed: Mapping[str, Any], grid: Sequence[int]) -> np.ndarray:
    """Position table resampled to ``grid`` exactly as the model does: [N, D]."""
    table = embed["pos_embed"]
    return np.asarray(resample_grid(table, grid), np.float32).reshape(-1, table.shape[-1])


def monai_vit_kwargs(
    vision: VisionTransformer, volume_size: Sequence[int] | None = None
) -> dict[str, Any]:
    """Arguments of ``monai.networks.nets.ViT`` for the 3D path (the user adds num_classes)."""
    volume_size = tuple(volume_size or vision.volume_size)
    token_grid(volume_size, vision.patch_3d)
    return {
        "in_channels": 1,
        "img_size": list(volume_size),
        "patch_size": list(vision.patch_3d),
        "hidden_size": vision.width,
        "mlp_dim": vision.mlp_dim,
        "num_layers": vision.depth,
        "num_heads": vision.num_heads,
        "proj_type": "conv",
        "pos_embed_type": "learnable",
        "classification": True,
        "dropout_rate": 0.0,
        "spatial_dims": 3,
        "qkv_bias": True,
    }


def monai_vit_state(
    params: Mapping[str, Any],
    vision: VisionTransformer,
    volume_size: Sequence[int] | None = None,
) -> Tensors:
    """The 3D tokenizer, backbone, final norm and [CLS] of ``params`` (the vision tree) as a
    state dict of MONAI's ViT: everything but the classification head the user adds.

    MONAI's position table covers the patches only and [CLS] is prepended after it is added, as
    in our model. Its TransformerBlock always builds an unused ``norm_cross_attn`` LayerNorm;
    identity values fill it so that loading is strict.
    """
    p = _host(params)
    embed = p["embed_3d"]
    grid = token_grid(tuple(volume_size or vision.volume_size), vision.patch_3d)
    weight, bias = _projection(embed, vision)
    tensors = {
        "cls_token": p["cls_token"].reshape(1, 1, -1),
        "patch_embedding.position_embeddings": _positions(embed, grid)[None],
        "patch_embedding.patch_embeddings.weight": weight,
        "patch_embedding.patch_embeddings.bias": bias,
        **_backbone(p["encoder"], _MONAI_BLOCK),
    }
    for i in range(vision.depth):
        tensors[f"blocks.{i}.norm_cross_attn.weight"] = np.ones(vision.width, np.float32)
        tensors[f"blocks.{i}.norm_cross_attn.bias"] = np.zeros(vision.width, np.float32)
    return tensors


def timm_vit_kwargs(
    vision: VisionTransformer, image_size: Sequence[int] | None = None, in_chans: int = 1
) -> dict[str, Any]:
    """Arguments of timm's ``VisionTransformer`` for the 2D path (features only: no head)."""
    image_size = tuple(image_size or vision.image_size)
    token_grid(image_size, vision.patch_2d)
    mlp_ratio = vision.mlp_dim / vision.width
    if int(vision.width * mlp_ratio) != vision.mlp_dim:  # timm sizes the MLP this way
        raise ValueError(f"mlp_dim {vision.mlp_dim} is not expressible as width * mlp_ratio")
    return {
        "img_size": list(image_size),
        "patch_size": list(vision.patch_2d),
        "in_chans": in_chans,
        "embed_dim": vision.width,
        "depth": vision.depth,
        "num_heads": vision.num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": True,
        "class_token": True,
        "no_embed_class": False,
        "global_pool": "token",
        "num_classes": 0,
    }


def timm_vit_state(
    params: Mapping[str, Any],
    vision: VisionTransformer,
    image_size: Sequence[int] | None = None,
    in_chans: int = 1,
) -> Tensors:
    """The 2D tokenizer, backbone, final norm and [CLS] as a timm VisionTransformer state dict.

    timm's default (class_token=True, no_embed_class=False) adds pos_embed after prepending
    [CLS], so pos_embed has a row for it; our [CLS] has no position, so that row is zero. The
    table is resampled to ``image_size`` here, as our model would, because timm resamples
    differently (bicubic). A single-channel kernel is split evenly over ``in_chans`` channels
    (w / C each), so a grey image replicated C times gives our features.
    """
    p = _host(params)
    embed = p["embed_2d"]
    grid = token_grid(tuple(image_size or vision.image_size), vision.patch_2d)
    weight, bias = _projection(embed, vision)
    if weight.shape[1] != in_chans:
        if weight.shape[1] != 1:
            raise ValueError(
                f"the 2D tokenizer takes {weight.shape[1]} channels; it exports only as such"
            )
        weight = np.repeat(weight, in_chans, axis=1) / in_chans
    positions = _positions(embed, grid)
    return {
        "cls_token": p["cls_token"].reshape(1, 1, -1),
        "pos_embed": np.concatenate([np.zeros_like(positions[:1]), positions])[None],
        "patch_embed.proj.weight": weight,
        "patch_embed.proj.bias": bias,
        **_backbone(p["encoder"], _TIMM_BLOCK),
    }


def hf_bert_state(params: Mapping[str, Any]) -> Tensors:
    """The text tower as a transformers BertModel state dict (HF names, no pooler)."""
    p = _host(params)
    torch_leaf = {key: names[0] for key, names in FILE_LEAVES.items()}
    tensors = {}
    for module, (hf_module, kind) in EMBEDDING_SOURCES.items():
        for leaf, value in p["embeddings"][module].items():
            tensors[f"{hf_module}.{torch_leaf[(kind, leaf)]}"] = value
    layers = p["layers"]
    for i in range(layers["query"]["bias"].shape[0]):
        layer = jax.tree.map(lambda a, i=i: a[i], layers)
        for module, (hf_module, kind) in LAYER_SOURCES.items():
            torch_tensors = _linear(layer[module]) if kind == "linear" else _norm(layer[module])
            for leaf, value in torch_tensors.items():
                tensors[f"encoder.layer.{i}.{hf_module}.{leaf}"] = value
    return tensors


def _write(out: str | Path, tensors: Tensors, config: Mapping[str, Any]) -> Path:
    """model.safetensors (contiguous float32, 'pt' format tag for transformers) + config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    contiguous = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    safetensors.numpy.save_file(contiguous, out / WEIGHTS, metadata={"format": "pt"})
    # safetensors creates the file readable by its owner alone; other files follow the umask.
    umask = os.umask(0)
    os.umask(umask)
    (out / WEIGHTS).chmod(0o666 & ~umask)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_monai(
    params: Mapping[str, Any],
    vision: VisionTransformer,
    out: str | Path,
    volume_size: Sequence[int] | None = None,
) -> Path:
    """Writes the 3D path for ``monai.networks.nets.ViT`` (and UNETR's ViT) into ``out``."""
    kwargs = monai_vit_kwargs(vision, volume_size)
    unetr_ok = vision.depth == 12 and tuple(vision.patch_3d) == (16, 16, 16)
    config = {
        "format": "monai",
        "class": "monai.networks.nets.ViT",
        "kwargs": kwargs,
        "input": "volumes [B, 1, D, H, W], preprocessed as for training",
        "layer_norm_eps": LAYER_NORM_EPS,
        "monai_layer_norm_eps": MONAI_LAYER_NORM_EPS,
        "unetr_compatible": unetr_ok,
        "notes": [
            "MONAI hard-codes LayerNorm eps 1e-5 and eps is not in a state dict: after loading, "
            "set it to layer_norm_eps (unimedi_jax.torch_model.load_monai_weights "
            "does, or: for m in vit.modules(): if isinstance(m, torch.nn.LayerNorm): "
            "m.eps = 1e-6). Left at "
            "1e-5, [CLS] features are off by ~1e-3 (it enters the blocks with a tiny variance).",
            "Missing on load: the classification head only. Features: vit.norm output "
            "(the token sequence before the head); [:, 0] is [CLS].",
            "UNETR fixes depth 12 and patch 16x16x16; its ViT has no class token, so drop "
            "cls_token and note that its tokens then differ from ours.",
        ],
    }
    return _write(out, monai_vit_state(params, vision, volume_size), config)


def export_timm(
    params: Mapping[str, Any],
    vision: VisionTransformer,
    out: str | Path,
    image_size: Sequence[int] | None = None,
    in_chans: int = 1,
) -> Path:
    """Writes the 2D path as a timm directory that ``timm.create_model("local-dir:...")`` reads.

    config.json follows timm's hub layout: ``model_args`` are the VisionTransformer arguments,
    and vit_base_patch16_224 is only the registered entry point they override.
    """
    kwargs = timm_vit_kwargs(vision, image_size, in_chans)
    config = {
        "architecture": "vit_base_patch16_224",
        "num_classes": 0,
        "num_features": vision.width,
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [in_chans, *kwargs["img_size"]],
            "fixed_input_size": True,
            "mean": [0.0] * in_chans,
            "std": [1.0] * in_chans,
            "num_classes": 0,
            "classifier": "head",
            "first_conv": "patch_embed.proj",
        },
        "unimedi": {
            "format": "timm",
            "class": "timm.models.vision_transformer.VisionTransformer",
            "input": "images [B, C, H, W], preprocessed as for training (no mean/std)",
            "layer_norm_eps": LAYER_NORM_EPS,
            "notes": [
                "pos_embed row 0 ([CLS]) is zero: our [CLS] has no position.",
                "The position table is resampled (bilinear) to img_size at export; export at "
                "the size you use rather than letting timm resample it (bicubic).",
                f"With in_chans > 1 the single-channel kernel is split evenly (w / {in_chans}).",
            ],
        },
    }
    return _write(out, timm_vit_state(params, vision, image_size, in_chans), config)


def export_hf_bert(
    params: Mapping[str, Any],
    config: BertConfig,
    out: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Writes the text tower (and its tokenizer) as a Hugging Face BertModel directory."""
    hf_config = {**config.to_hf_dict(), "architectures": ["BertModel"]}
    out = _write(out, hf_bert_state(params), hf_config)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def torch_vision_state(params: Mapping[str, Any], vision: VisionTransformer) -> Tensors:
    """Both vision paths for ``unimedi_jax.torch_model``: the raw tokenizer convolutions (the
    model standardises its inputs with pixel_mean/std itself, as ours does), the position tables
    at the training grids (X-ray, CT slice, volume: resampled here as our model does), [CLS],
    the shared blocks under timm's names and the final norm."""
    p = _host(params)
    embed_2d, embed_3d = p["embed_2d"], p["embed_3d"]
    grids = {
        "pos_image": (embed_2d, token_grid(vision.image_size, vision.patch_2d)),
        "pos_slice": (embed_2d, token_grid(vision.volume_size[1:], vision.patch_2d)),
        "pos_volume": (embed_3d, token_grid(vision.volume_size, vision.patch_3d)),
    }
    return {
        "cls_token": p["cls_token"],
        "embed_2d.weight": _conv_weight(embed_2d["proj"]["kernel"]),
        "embed_2d.bias": embed_2d["proj"]["bias"],
        "embed_3d.weight": _conv_weight(embed_3d["proj"]["kernel"]),
        "embed_3d.bias": embed_3d["proj"]["bias"],
        **{name: _positions(embed, grid) for name, (embed, grid) in grids.items()},
        **_backbone(p["encoder"], _TIMM_BLOCK),
    }


def preprocessing(config) -> dict[str, Any]:
    """What a run's inputs went through before the model, in words and values (export configs
    and model cards), from the run's own config and its recorded ``preprocessing`` group."""
    model, data = config.model, config.data
    recorded = config.get("preprocessing")  # the run's record; None before runs kept one
    if recorded is not None and hasattr(recorded, "to_dict"):
        recorded = recorded.to_dict()
    stored = (recorded or {}).get("image_stored_size")
    square = f"a {stored}x{stored} square" if stored else "a square of the prepared size"
    described = {
        "image": {
            "input": "X-rays [B, H, W] float32 in [0, 1], grey, frontal view",
            "size": list(model.image_size),
            "steps": "read (DICOM: modality and VOI LUT / window, MONOCHROME1 inverted; JPEG/PNG "
            f"as grey), scaled to [0, 255], letterboxed to {square}, centre-cropped to "
            f"{model.image_size[0]}x{model.image_size[1]}, divided by 255",
        },
        "volume": {
            "input": "CT volumes [B, D, H, W] float32 in [0, 1], axial slices along D",
            "size": list(model.volume_size),
            "hu_window": list(data.hu_window),
            "steps": "read (NIfTI, or a DICOM series ordered by slice position), reoriented to "
            f"the canonical orientation, resized to {'x'.join(map(str, model.volume_size))} "
            f"(D x H x W), Hounsfield units clipped to {list(data.hu_window)} and mapped "
            "linearly to [0, 1]",
        },
        "standardisation": {
            "pixel_mean": model.pixel_mean,
            "pixel_std": model.pixel_std,
            "where": "inside the model: (x - pixel_mean) / pixel_std before each tokenizer "
            "(torch format), folded into the patch projection (monai, timm); "
            "give the model the [0, 1] inputs above",
        },
        "text": {
            "max_length": config.text.max_length,
            "steps": "the exported tokenizer, padded and truncated to max_length tokens",
            "pooling": config.text.pooling,
        },
    }
    if recorded is not None:
        described["recorded"] = recorded
        described["from_files"] = (
            "data_pipelines.transforms.FilePreprocessing.from_record(recorded).image(path) / "
            ".volume(path) apply these steps to a file (numpy, no jax); torch_model's "
            "read_image / read_volume call them"
        )
    return described


def torch_vision_config(vision: VisionTransformer, k: int) -> dict[str, Any]:
    """The vision part of the torch format's config.json (``torch_model.VisionTower``)."""
    return {
        "width": vision.width,
        "depth": vision.depth,
        "num_heads": vision.num_heads,
        "mlp_dim": vision.mlp_dim,
        "patch_2d": list(vision.patch_2d),
        "patch_3d": list(vision.patch_3d),
        "image_size": list(vision.image_size),
        "volume_size": list(vision.volume_size),
        "pixel_mean": vision.pixel_mean,
        "pixel_std": vision.pixel_std,
        "layer_norm_eps": LAYER_NORM_EPS,
        "attention_layers": vision.attention_layers,
        "selection_k": k,
    }


def torch_config(run) -> dict[str, Any]:
    """config.json of the torch format: everything ``torch_model.load`` builds from."""
    vision, config = run.model.vision, run.config
    return {
        "format": "torch",
        "model": "UniMedI",
        "loader": "unimedi_jax.torch_model.load",
        "step": run.step,
        "vision": torch_vision_config(vision, config.selection.k),
        "text": {
            "dir": TEXT_DIR,
            "max_length": config.text.max_length,
            "pooling": config.text.pooling,
        },
        "embed_dim": run.model.embed_dim,
        "preprocessing": preprocessing(config),
    }


def export_torch(run, out: str | Path, weights: str | None = None) -> Path:
    """Writes the whole model of a loaded run (``inference.load``) for ``torch_model.load``:
    the vision tower inference uses (``weights``: student | teacher, None: the run's
    ``vision_weights``), both projections, the capped logit scale CLIP trained with, and the text
    tower with its tokenizer as a Hugging Face directory under ``text/``."""
    vision_params = run.params_for(weights)["vision"]
    p = _host({key: run.student[key] for key in ("image_proj", "text_proj", "logit_scale")})
    scale = np.exp(min(float(p["logit_scale"]["value"]), np.log(run.config.loss.max_logit_scale)))
    vision = torch_vision_state(vision_params, run.model.vision)
    tensors = {
        **{f"vision.{name}": value for name, value in vision.items()},
        "image_proj.weight": p["image_proj"]["Dense_0"]["kernel"].T,
        "text_proj.weight": p["text_proj"]["Dense_0"]["kernel"].T,
        "logit_scale": np.asarray(scale, np.float32),
    }
    out = _write(out, tensors, torch_config(run))
    export_hf_bert(run.student["text"], run.model.text.config, out / TEXT_DIR, run.tokenizer)
    return out


_RECIPES = {
    "torch": """```python
from unimedi_jax import torch_model  # needs torch, safetensors, transformers; never jax

model = torch_model.load("{out}")
images = model.encode_image(xrays)      # [B, H, W] float in [0, 1] -> [B, E], L2-normalised
volumes = model.encode_volume(cts)      # [B, D, H, W] in [0, 1], attentive slice selection
texts = model.encode_text(["Left pleural effusion."])
probs = (model.logit_scale * images @ texts.T).softmax(dim=-1)  # zero-shot
```""",
    "monai": """```python
import json

from monai.networks.nets import ViT
from unimedi_jax.torch_model import load_monai_weights  # sets LayerNorm eps to 1e-6

vit = ViT(**json.load(open("{out}/config.json"))["kwargs"], num_classes=C)
load_monai_weights(vit, "{out}")   # volumes [B, 1, D, H, W] in [0, 1]
```""",
    "timm": """```python
import timm

vit = timm.create_model("local-dir:{out}", pretrained=True)  # images [B, C, H, W] in [0, 1]
```""",
    "hf_bert": """```python
from transformers import AutoTokenizer, BertModel

bert = BertModel.from_pretrained("{out}", add_pooling_layer=False)
tokenizer = AutoTokenizer.from_pretrained("{out}")
```""",
}
_HOLDS = {
    "torch": "the whole model: both vision paths (2D and 3D tokenizers, shared backbone), the "
    "text tower with its tokenizer (`text/`), both projections into the shared space and the "
    "logit scale",
    "monai": "the 3D path (3D tokenizer and shared backbone) for MONAI's `ViT` / UNETR",
    "timm": "the 2D path (2D tokenizer and shared backbone) for timm's `VisionTransformer`",
    "hf_bert": "the text tower as a Hugging Face `BertModel` directory with its tokenizer",
}


def _figures(workdir: Path, step: int) -> str:
    """The held-out figures of the exported checkpoint (the run's evaluation of that step) as a
    Markdown table, or a line saying why there are none: another step's figures never."""
    results = result_of_step(workdir, step)
    if results is None:
        return (
            f"No evaluation of step {step} in the run: run `python -m unimedi_jax.evaluate "
            f"--workdir={workdir}/checkpoints/{step}` and export again."
        )
    rows = [
        f"| {name} | {value:.4f} |"
        for name, value in sorted(results.items())
        if name != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    ]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def model_card(run, fmt: str, workdir: Path, weights: str | None = None) -> str:
    """README.md of an export: what it holds, the training data and config, the run's held-out
    figures, the preprocessing, and how to load it."""
    config, model = run.config, run.model
    vision = model.vision
    text = config.text
    lines = [
        f"# UniMedI ({fmt} export)",
        "",
        "UniMedI (Unified Medical Image Pre-training in Language-Guided Common Semantic Space): "
        "one ViT with a 2D and a 3D tokenizer, trained with a text tower so that chest X-rays, "
        "chest CT volumes and their radiology reports share one embedding space. Exported by "
        f"unimedi-jax from `{workdir}`, checkpoint step {run.step}.",
        "",
        f"This folder holds {_HOLDS[fmt]}.",
        "",
        "## Training",
        "",
        f"- data: X-rays from `{config.data.sources_2d}`, CTs from `{config.data.sources_3d}`",
        f"- vision: width {vision.width}, depth {vision.depth}, heads {vision.num_heads}, MLP "
        f"{vision.mlp_dim}, patches {list(vision.patch_2d)} (2D) and {list(vision.patch_3d)} (3D),"
        f" X-rays {list(vision.image_size)}, volumes {list(vision.volume_size)}",
        f"- text: {'`' + text.path + '`' if text.path else 'BERT trained from scratch'}, "
        f"max_length {text.max_length}, pooling {text.pooling}",
        f"- vision weights: the {weights or config.vision_weights}'s (the run's held-out figures "
        f"below are the {config.vision_weights}'s)",
        f"- selection: {config.selection.mode}, k={config.selection.k} slices, "
        f"Eq. 1 over {config.selection.layers} layers",
        f"- steps: {config.total_steps}, seed {config.seed}; the full config is the run's "
        "`config.json`",
        "",
        "## Held-out figures",
        "",
        _figures(workdir, run.step),
        "",
        "## Preprocessing",
        "",
        "```json",
        json.dumps(preprocessing(config), indent=2),
        "```",
        "",
        "## Loading",
        "",
        _RECIPES[fmt].replace("{out}", "EXPORT_DIR"),
        "",
    ]
    return "\n".join(lines)


def export_run(
    workdir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    size: Sequence[int] | None = None,
    in_chans: int = 1,
    weights: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Loads a run (``unimedi_jax.inference.load``) and exports one format with its model card
    into ``out``, which must lie outside the run and appears only when complete. ``size``: timm
    image H,W or monai volume D,H,W (default: the training size); ``weights``: the student's
    or the EMA teacher's vision tower (None: the run's ``vision_weights``)."""
    # Imported here: the conversions above never load a whole run.
    from unimedi_jax.evaluation.trained_model import load, resolve_run

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    if fmt in ("torch", "hf_bert") and size is not None:
        raise ExportError(
            f"--size applies to the monai and timm formats; the {fmt} format is written at the "
            "run's training sizes. Leave --size out."
        )
    run_dir = resolve_run(workdir)[0]
    check_output(out, run_dir, overwrite, is_dir=True)
    run = load(workdir)
    params = run.params_for(weights)
    with written_atomically(out, is_dir=True) as partial:
        if fmt == "torch":
            export_torch(run, partial, weights)
        elif fmt == "monai":
            export_monai(params["vision"], run.model.vision, partial, size)
        elif fmt == "timm":
            export_timm(params["vision"], run.model.vision, partial, size, in_chans)
        else:
            export_hf_bert(params["text"], run.model.text.config, partial, run.tokenizer)
        (Path(partial) / MODEL_CARD).write_text(model_card(run, fmt, run_dir, weights))
    return Path(out)
