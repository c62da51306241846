"""UniMedI: the vision and text towers and their heads wired together (no training logic).

The train step composes the methods below: it runs the teacher (an EMA copy of ``vision`` and
``dino_head``) and the student through the same module with different parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from unimedi_jax.models.heads import DINOHead, LogitScale, Projection
from unimedi_jax.models.text import BertConfig, BertEncoder
from unimedi_jax.models.vit import EncoderOutput, VisionTransformer

# The sub-trees of the parameters that the EMA teacher holds.
TEACHER_KEYS = ("vision", "dino_head")
# How a report's hidden states become one feature: the [CLS] state (the paper, for a pretrained
# BERT) or the mean over its tokens (padding excluded), for a tower trained from scratch.
TEXT_POOLINGS = ("cls", "mean")
# The two kinds of vision input, as a batch and the per-modality config fields name them:
# 2D images (X-rays) and 3D volumes (CTs).
MODALITIES = ("image", "volume")


def pool_text(hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """Hidden states [B, L, D] -> one feature per report [B, D] (``TEXT_POOLINGS``; a config's
    ``text.pooling`` is checked in config/checks.py).

    A from-scratch tower's [CLS] state starts out the same for every templated report (pairwise
    cosine ~0.9999), which leaves CLIP at its collapsed start for hundreds of steps; the mean over
    the report's own tokens differs from report to report from the first step.
    """
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
    return (summed / jnp.maximum(weights.sum(axis=1), 1.0)).astype(hidden.dtype)


class UniMedI(nn.Module):
    """Vision tower, text tower, projections to the shared space, DINO head, logit scale."""

    vision: VisionTransformer
    text: BertEncoder
    embed_dim: int = 512
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    dino_out_dim: int = 8192
    init_temperature: float = 0.07
    text_pooling: str = "cls"
    dtype: jnp.dtype | type = jnp.float32

    def setup(self):
        self.image_proj = Projection(self.embed_dim, self.dtype)
        self.text_proj = Projection(self.embed_dim, self.dtype)
        self.dino_head = DINOHead(
            self.dino_hidden_dim, self.dino_bottleneck_dim, self.dino_out_dim, dtype=self.dtype
        )
        self.logit_scale = LogitScale(self.init_temperature)

    def encode_vision(
        self, x: jax.Array, slices: jax.Array | None = None, mask: jax.Array | None = None
    ) -> EncoderOutput:
        """Images [B, H, W] or volumes [B, D, H, W] (+ slices [B, k, h, w]) -> tokens, Eq. 1."""
        return self.vision(x, slices, mask)

    def project_vision(self, cls_features: jax.Array) -> jax.Array:
        """[CLS] features of X-rays or CT volumes -> L2-normalised shared-space embeddings."""
        return self.image_proj(cls_features)

    def encode_text(
        self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """Token ids -> last hidden states [B, L, D] of the text tower."""
        return self.text(input_ids, attention_mask, deterministic=deterministic)

    def embed_text(
        self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """Token ids -> L2-normalised shared-space embeddings of the pooled report."""
        hidden = self.encode_text(input_ids, attention_mask, deterministic)
        return self.text_proj(pool_text(hidden, attention_mask, self.text_pooling))

    def dino(self, tokens: jax.Array) -> jax.Array:
        """DINO head logits for [CLS] ([B, D]) or patch tokens ([B, N, D]), float32."""
        return self.dino_head(tokens)

    def __call__(
        self,
        images: jax.Array,
        volumes: jax.Array,
        slices: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
    ) -> dict[str, jax.Array]:
        """Touches every parameter once (used by ``init``); returns each path's outputs."""
        out_2d = self.encode_vision(images)
        out_3d = self.encode_vision(volumes, slices)
        return {
            "image_embedding": self.project_vision(out_2d.tokens[:, 0]),
            "volume_embedding": self.project_vision(out_3d.tokens[:, 0]),
            "text_embedding": self.embed_text(input_ids, attention_mask),
            "dino_2d": self.dino(out_2d.tokens),
            "dino_3d": self.dino(out_3d.tokens),
            "logit_scale": self.logit_scale(),
        }


def build_unimedi(config, text_config: BertConfig, dtype: jnp.dtype | type) -> UniMedI:
    """UniMedI from a pre-training config (a saved one passed through ``upgrade_config``) and
    the text tower's BertConfig."""
    model_cfg = config.model
    vision = VisionTransformer(
        width=model_cfg.width,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_dim=model_cfg.mlp_dim,
        patch_2d=tuple(model_cfg.patch_2d),
        patch_3d=tuple(model_cfg.patch_3d),
        image_size=tuple(model_cfg.image_size),
        volume_size=tuple(model_cfg.volume_size),
        dtype=dtype,
        remat=model_cfg.remat,
        unroll_layers=model_cfg.unroll_layers,
        pixel_mean=model_cfg.pixel_mean,
        pixel_std=model_cfg.pixel_std,
        attention_layers=config.selection.layers,
        attention=model_cfg.attention,
    )
    return UniMedI(
        vision=vision,
        text=BertEncoder(
            text_config,
            dtype=dtype,
            remat=model_cfg.remat,
            unroll_layers=model_cfg.unroll_layers,
            attention=model_cfg.attention,
        ),
        embed_dim=model_cfg.embed_dim,
        dino_hidden_dim=model_cfg.dino_hidden_dim,
        dino_bottleneck_dim=model_cfg.dino_bottleneck_dim,
        dino_out_dim=model_cfg.dino_out_dim,
        init_temperature=config.loss.init_temperature,
        text_pooling=config.text.pooling,
        dtype=dtype,
    )


def init_inputs(config) -> tuple[jax.Array, ...]:
    """One-sample inputs for ``UniMedI.__call__`` that touch every parameter (for init)."""
    model_cfg = config.model
    ids = jnp.zeros((1, config.text.max_length), jnp.int32)
    return (
        jnp.zeros((1, *model_cfg.image_size)),
        jnp.zeros((1, *model_cfg.volume_size)),
        jnp.zeros((1, config.selection.k, *model_cfg.volume_size[1:])),
        ids,
        jnp.ones_like(ids),
    )
