"""UniMedI in PyTorch: load an export and embed X-rays, CT volumes and reports.

For PyTorch users: imports torch, safetensors and transformers (monai for
``load_monai_weights``), never jax or flax, so it runs where JAX is not installed.

    python -m unimedi_jax.export --workdir=runs/demo --format=torch --out=export/torch

    from unimedi_jax import torch_model
    model = torch_model.load("export/torch")
    image_emb = model.encode_image(xrays)     # [B, H, W] float in [0, 1] -> [B, E]
    volume_emb = model.encode_volume(cts)     # [B, D, H, W] in [0, 1], attentive slice selection
    text_emb = model.encode_text(["Left pleural effusion."])
    probs = (model.logit_scale * image_emb @ text_emb.T).softmax(dim=-1)

The embeddings are L2-normalised and match ``inference.load(run).embed_images / embed_volumes
/ embed_texts`` (float32, within 1e-4). Inputs are at the training sizes the export's
``config.json`` states, with the preprocessing it describes (``preprocessing``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, BertModel

from unimedi_jax.core.errors import UserError
from unimedi_jax.interop.formats import CONFIG, LAYER_NORM_EPS, WEIGHTS

# Where torch_model.load finds a format other than torch's: what to use instead.
_OTHER_FORMATS = {
    "monai": "monai.networks.nets.ViT with unimedi_jax.torch_model.load_monai_weights",
    "timm": "timm.create_model('local-dir:DIR', pretrained=True)",
    "hf_bert": "transformers.BertModel.from_pretrained",
}


class ExportNotFoundError(UserError, FileNotFoundError):
    """A folder that is not a torch-format export."""


class NoPreprocessingError(UserError, ValueError):
    """An export of a run that recorded no file preprocessing, asked to read a file."""


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """As the JAX model's l2_normalize: x / max(||x||, 1e-6)."""
    return F.normalize(x.float(), dim=-1, eps=1e-6)


def top_k_slices(attention: torch.Tensor, depth: int, patch_depth: int, k: int) -> torch.Tensor:
    """Eq. 2 and the top k of method/selection.py: each slice scores the mean Eq. 1 attention
    [B, N] of the 3D tokens of its depth block; the k best slices [B, k], ascending, ties to the
    lower slice (jax.lax.top_k's rule: the slices of one block always tie)."""
    grid_depth = depth // patch_depth
    blocks = attention.float().reshape(len(attention), grid_depth, -1).mean(-1)
    scores = blocks.repeat_interleave(patch_depth, dim=1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


class Block(nn.Module):
    """Pre-LN block (timm's parameter names) that also returns its [CLS]->patch attention."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, mlp_dim)
        self.mlp.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.attn.proj(attended)
        cls_logits = torch.einsum("bhc,bhnc->bhn", q[:, :, 0], k[:, :, 1:]) / math.sqrt(head_dim)
        cls_attention = cls_logits.softmax(dim=-1).mean(dim=1)
        x = x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))
        return x, cls_attention


class VisionTower(nn.Module):
    """The dual-tokenizer ViT at its training sizes: 2D and 3D tokenizers, one backbone.

    Returns the final-norm tokens and Eq. 1 of the paper (the [CLS] query's attention over the
    patch keys, averaged over heads and over all layers or the last one).
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.width = width = cfg["width"]
        eps = cfg["layer_norm_eps"]
        self.patch_2d, self.patch_3d = tuple(cfg["patch_2d"]), tuple(cfg["patch_3d"])
        self.image_size, self.volume_size = tuple(cfg["image_size"]), tuple(cfg["volume_size"])
        self.pixel_mean, self.pixel_std = cfg["pixel_mean"], cfg["pixel_std"]
        self.attention_layers = cfg["attention_layers"]
        self.embed_2d = nn.Conv2d(1, width, self.patch_2d, stride=self.patch_2d)
        self.embed_3d = nn.Conv3d(1, width, self.patch_3d, stride=self.patch_3d)
        self.cls_token = nn.Parameter(torch.zeros(width))
        grid = lambda size, patch: math.prod(s // p for s, p in zip(size, patch, strict=True))
        self.pos_image = nn.Parameter(torch.zeros(grid(self.image_size, self.patch_2d), width))
        self.pos_slice = nn.Parameter(torch.zeros(grid(self.volume_size[1:], self.patch_2d), width))
        self.pos_volume = nn.Parameter(torch.zeros(grid(self.volume_size, self.patch_3d), width))
        self.blocks = nn.ModuleList(
            Block(width, cfg["num_heads"], cfg["mlp_dim"], eps) for _ in range(cfg["depth"])
        )
        self.norm = nn.LayerNorm(width, eps=eps)

    def tokens(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[B, *spatial] in [0, 1] -> standardised patch embeddings [B, N, D] (no position)."""
        x = (x.float()[:, None] - self.pixel_mean) / self.pixel_std
        return conv(x).flatten(2).transpose(1, 2)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with positions [B, N, D] -> (final-norm tokens [B, 1 + N, D], Eq. 1)."""
        cls = self.cls_token.expand(len(patches), 1, -1)
        x = torch.cat([cls, patches], dim=1)
        attentions = []
        for block in self.blocks:
            x, attention = block(x)
            attentions.append(attention)
        eq1 = attentions[-1] if self.attention_layers == "last" else torch.stack(attentions).mean(0)
        return self.norm(x), eq1

    def image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X-rays [B, H, W] -> (tokens, Eq. 1)."""
        _check_shape(images, self.image_size, "images")
        return self(self.tokens(self.embed_2d, images) + self.pos_image)

    def volume(
        self, volumes: torch.Tensor, slices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Volumes [B, D, H, W], optionally followed by the 2D tokens of their ``slices``
        [B, k, H, W], in one pass -> (tokens, Eq. 1)."""
        _check_shape(volumes, self.volume_size, "volumes")
        patches = self.tokens(self.embed_3d, volumes) + self.pos_volume
        if slices is not None:
            b = len(slices)
            slice_tokens = self.tokens(self.embed_2d, slices.flatten(0, 1)) + self.pos_slice
            patches = torch.cat([patches, slice_tokens.reshape(b, -1, self.width)], dim=1)
        return self(patches)


def _check_shape(x: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(
            f"{what} of shape {tuple(x.shape)}: this export takes [B, "
            f"{', '.join(map(str, expected))}] (the training size; see its config.json)"
        )


class UniMedI(nn.Module):
    """Vision and text towers with their projections into the shared space, and the logit scale.

    ``encode_image`` / ``encode_volume`` / ``encode_text`` return L2-normalised embeddings;
    ``logit_scale`` is the (capped) scale CLIP trained with: logits = scale * a @ b.T.
    """

    def __init__(self, config: dict[str, Any], text: BertModel, tokenizer: Any):
        super().__init__()
        self.config = config
        vision_cfg = config["vision"]
        self.k = vision_cfg["selection_k"]
        self.vision = VisionTower(vision_cfg)
        self.text = text
        self.tokenizer = tokenizer
        self.image_proj = nn.Linear(vision_cfg["width"], config["embed_dim"], bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, config["embed_dim"], bias=False)
        self.register_buffer("logit_scale", torch.tensor(1.0))

    def _files(self) -> Any:
        """The run's recorded file preprocessing (numpy, jax-free: data_pipelines)."""
        from data_pipelines.transforms import FilePreprocessing

        recorded = self.config["preprocessing"].get("recorded")
        if recorded is None:
            raise NoPreprocessingError(
                f"the export's {CONFIG} records no preprocessing group (the run predates it): "
                "read files with data_pipelines.transforms.xray_from_file / volume_from_file "
                "at the sizes its preprocessing section states"
            )
        return FilePreprocessing.from_record(recorded)

    def read_image(self, path: str | Path) -> torch.Tensor:
        """An X-ray file (JPEG, PNG, DICOM) -> [1, H, W] in [0, 1], as the run trained on: the
        reader of ``inference.read_image`` (``FilePreprocessing``), so the same files are
        accepted and the same refused (``InputFileError``)."""
        return torch.from_numpy(self._files().image(path))[None]

    def read_volume(self, path: str | Path, intensity: str = "auto") -> torch.Tensor:
        """A CT file (NIfTI) or DICOM series folder -> [1, D, H, W] in [0, 1], as trained, by
        the reader of ``inference.read_volume`` (``intensity`` as there)."""
        return torch.from_numpy(self._files().volume(path, intensity))[None]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Final-norm [CLS] features [B, width] of X-rays [B, H, W]."""
        return self.vision.image(images)[0][:, 0]

    def select_slices(self, volumes: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Indices [B, k] (ascending) of the slices with the highest Eq. 2 scores: the mean
        Eq. 1 attention of the 3D tokens whose depth block holds the slice; ties go to the lower
        slice (as jax.lax.top_k)."""
        _, attention = self.vision.volume(volumes)
        return top_k_slices(attention, volumes.shape[1], self.vision.patch_3d[0], k or self.k)

    def volume_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """[CLS] of volumes [B, D, H, W] in one pass with their k selected slices (Sec. 3.3)."""
        indices = self.select_slices(volumes)
        slices = volumes[torch.arange(len(indices))[:, None], indices]  # [B, k, H, W]
        return self.vision.volume(volumes, slices)[0][:, 0]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """X-rays [B, H, W] in [0, 1] -> L2-normalised embeddings [B, E]."""
        return _l2_normalize(self.image_proj(self.image_features(images)))

    def encode_volume(self, volumes: torch.Tensor) -> torch.Tensor:
        """CT volumes [B, D, H, W] in [0, 1] -> L2-normalised embeddings [B, E]."""
        return _l2_normalize(self.image_proj(self.volume_features(volumes)))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Reports -> L2-normalised embeddings [B, E], tokenised as in training."""
        text_cfg = self.config["text"]
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=text_cfg["max_length"],
            return_tensors="pt",
        ).to(self.text_proj.weight.device)
        mask = encoded["attention_mask"]
        hidden = self.text(input_ids=encoded["input_ids"], attention_mask=mask).last_hidden_state
        if text_cfg["pooling"] == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.float()[..., None]
            pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return _l2_normalize(self.text_proj(pooled))


def load(directory: str | Path, device: str | torch.device = "cpu") -> UniMedI:
    """The UniMedI of a torch-format export (``export --format=torch``), in eval mode."""
    directory = Path(directory)
    config_path = directory / CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("format") != "torch":
        found = config.get("format") or config.get("unimedi", {}).get("format")
        if config.get("model_type") == "bert":  # a Hugging Face config: the hf_bert format
            found = "hf_bert"
        hint = ""
        if found in _OTHER_FORMATS:
            hint = f" It holds the {found} format: load it with {_OTHER_FORMATS[found]}."
        raise ExportNotFoundError(
            f"{directory} is not a torch-format export (no {CONFIG} with format 'torch').{hint} "
            "Write one with python -m unimedi_jax.export --workdir=RUN --format=torch "
            f"--out={directory}."
        )
    text_dir = directory / config["text"]["dir"]
    text = BertModel.from_pretrained(text_dir, add_pooling_layer=False)
    model = UniMedI(config, text, AutoTokenizer.from_pretrained(text_dir))
    state = {f"text.{name}": value for name, value in text.state_dict().items()}
    state.update(load_file(directory / WEIGHTS))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def load_monai_weights(vit: nn.Module, directory: str | Path) -> list[str]:
    """Loads a monai export into a MONAI ViT (or ``unetr.vit``) and sets LayerNorm eps to ours.

    Returns the keys left at their initial values: the classification head, if the ViT has one.
    Anything else missing or unexpected is an error: the ViT was built with other arguments.
    """
    state = load_file(Path(directory) / WEIGHTS)
    if "cls_token" not in vit.state_dict():  # UNETR builds its ViT without a class token
        del state["cls_token"]
    result = vit.load_state_dict(state, strict=False)
    stray = [k for k in result.missing_keys if not k.startswith("classification_head.")]
    if stray or result.unexpected_keys:
        raise ValueError(
            f"the ViT does not match the export (missing {stray}, unexpected "
            f"{result.unexpected_keys}); build it with the kwargs in {CONFIG}"
        )
    for module in vit.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = LAYER_NORM_EPS
    return list(result.missing_keys)
