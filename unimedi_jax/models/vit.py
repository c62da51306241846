"""One ViT for X-rays and CT volumes: two tokenizers, one shared pre-LN backbone.

A 2D image becomes ``[CLS] + 2D tokens``; a volume becomes ``[CLS] + 3D tokens + the 2D tokens of
k selected slices`` (paper section 3.3), all in one pass through the same blocks. Besides the
final tokens the encoder returns Eq. 1 of the paper: the [CLS] query's softmax attention over the
patch keys, averaged over layers and heads, computed from q_cls and K only (no N x N map).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from unimedi_jax.models.layers import (
    dense_init,
    dot_product_attention,
    ones_init,
    scanned,
    zeros_init,
)

Dtype = jnp.dtype | type
# Which layers' [CLS] attention Eq. 1 averages (config ``selection.layers``).
ATTENTION_LAYERS = ("all", "last")


def layer_norm(name: str, eps: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm computed in float32 whatever the compute dtype."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        scale_init=ones_init(("embed",)),
        bias_init=zeros_init(("embed",)),
        name=name,
    )


def resample_grid(table: jax.Array, grid: Sequence[int]) -> jax.Array:
    """Resamples a position table [*native_grid, D] to ``grid`` (bilinear/trilinear).

    At the native grid the table is returned untouched, so the common case is exact.
    """
    grid = tuple(grid)
    if table.shape[:-1] == grid:
        return table
    return jax.image.resize(table, (*grid, table.shape[-1]), method="linear", antialias=False)


def token_grid(spatial_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    """Token grid of an input of ``spatial_shape`` cut into ``patch`` blocks: the one place the
    grid is computed (tokenizers, slice selection, masks, figures, exports). Fails clearly when a
    side is not a multiple of the patch."""
    if len(spatial_shape) != len(patch) or any(
        s % p for s, p in zip(spatial_shape, patch, strict=True)
    ):
        raise ValueError(
            f"input of spatial shape {tuple(spatial_shape)} is not divisible by the patch "
            f"size {tuple(patch)}; set the image/volume size to a multiple of the patch"
        )
    return tuple(s // p for s, p in zip(spatial_shape, patch, strict=True))


class PatchProjection(nn.Module):
    """A patch-sized, patch-strided convolution as one reshape and one matmul.

    A 1-channel convolution uses the matrix units poorly (a CT's 3D tokenizer most); cutting the
    input into patch rows and multiplying by the flattened kernel is the same linear map. The
    parameters are those of the ``nn.Conv`` it replaces (kernel [*patch, C, D], bias [D], same
    names and inits), so checkpoints of either load in the other.
    """

    width: int
    patch: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, *spatial, C] -> [B, N, D], tokens row-major over the patch grid."""
        rank, channels = len(self.patch), x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (*((None,) * rank), None, "embed")
            ),
            (*self.patch, channels, self.width),
        )
        bias = self.param("bias", zeros_init(("embed",)), (self.width,))
        grid = token_grid(x.shape[1:-1], self.patch)
        # [B, g1, p1, g2, p2, ..., C] -> [B, g1, g2, ..., p1, p2, ..., C] -> [B, N, p1 p2 ... C]
        split = x.reshape(
            x.shape[0], *(n for pair in zip(grid, self.patch, strict=True) for n in pair), channels
        )
        order = (0, *range(1, 2 * rank, 2), *range(2, 2 * rank + 1, 2), 2 * rank + 1)
        patches = split.transpose(order).reshape(x.shape[0], math.prod(grid), -1)
        patches, kernel, bias = nn.dtypes.promote_dtype(patches, kernel, bias, dtype=self.dtype)
        return jnp.dot(patches, kernel.reshape(-1, self.width)) + bias


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear embedding, plus a learned position table.

    Works for 2D (patch of rank 2) and 3D (rank 3). The position table is learned at
    ``native_grid`` and resampled to whatever grid the input produces, so one 2D tokenizer serves
    224x224 X-rays (14x14) and 128x128 CT slices (8x8).

    Inputs in [0, 1] are standardised, ``(x - pixel_mean) / pixel_std``, before the projection.
    Without it every patch token is dominated by one shared direction (the patch's mean
    intensity) whose length the blocks' LayerNorms divide out, so brightness, which is what
    tells an effusion or a consolidation from aerated lung, reaches attention and MLPs only
    weakly, and training from scratch stalls. Being affine, it folds exactly into the
    projection for export.
    """

    width: int
    patch: tuple[int, ...]
    native_grid: tuple[int, ...]
    in_chans: int = 1
    dtype: Dtype = jnp.float32
    pixel_mean: float = 0.0
    pixel_std: float = 1.0

    def setup(self):
        self.proj = PatchProjection(self.width, self.patch, self.dtype)
        self.pos_embed = self.param(
            "pos_embed",
            nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (*((None,) * len(self.native_grid)), "embed")
            ),
            (*self.native_grid, self.width),
        )

    def grid_of(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        return token_grid(spatial_shape, self.patch)

    def tokens(self, x: jax.Array) -> jax.Array:
        """[B, *spatial] or [B, *spatial, C] -> patch embeddings [B, N, D] (no position)."""
        if x.ndim == len(self.patch) + 1:
            x = x[..., None]
        x = (x.astype(jnp.float32) - self.pixel_mean) / self.pixel_std
        return self.proj(x.astype(self.dtype))

    def position(self, grid: Sequence[int]) -> jax.Array:
        """Position embeddings [N, D] for a token grid."""
        return resample_grid(self.pos_embed, grid).reshape(-1, self.width)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.tokens(x) + self.position(self.grid_of(x.shape[1 : 1 + len(self.patch)]))


class EncoderOutput(NamedTuple):
    tokens: jax.Array  # [B, 1 + N, D] after the final LayerNorm; [:, 0] is [CLS]
    cls_attention: jax.Array  # [B, N]: Eq. 1, rows sum to 1


class Block(nn.Module):
    """Pre-LN transformer block that also returns its [CLS]->patch attention (heads averaged).

    ``attention`` is ``model.attention`` (layers.ATTENTION_IMPLEMENTATIONS). Eq. 1 needs only the
    [CLS] query's row, computed apart from q_cls and K in float32, so no implementation has to
    give up its attention matrix.
    """

    width: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        head_dim = self.width // self.num_heads

        def project(name: str) -> jax.Array:
            return nn.DenseGeneral(
                (self.num_heads, head_dim),
                dtype=self.dtype,
                kernel_init=dense_init(("embed", "heads", "kv")),
                bias_init=zeros_init(("heads", "kv")),
                name=name,
            )(h)

        h = layer_norm("norm1")(x)
        q, k, v = project("query"), project("key"), project("value")
        attended = dot_product_attention(q, k, v, self.attention)
        x = x + nn.DenseGeneral(
            self.width,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=dense_init(("heads", "kv", "embed")),
            bias_init=zeros_init(("embed",)),
            name="out",
        )(attended)
        cls_logits = jnp.einsum(
            "bhc,bnhc->bhn", q[:, 0].astype(jnp.float32), k[:, 1:].astype(jnp.float32)
        ) / math.sqrt(head_dim)
        cls_attention = jax.nn.softmax(cls_logits, axis=-1).mean(axis=1)

        h = layer_norm("norm2")(x)
        h = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=dense_init(("embed", "mlp")),
            bias_init=zeros_init(("mlp",)),
            name="fc1",
        )(h)
        h = nn.gelu(h, approximate=False)
        h = nn.Dense(
            self.width,
            dtype=self.dtype,
            kernel_init=dense_init(("mlp", "embed")),
            bias_init=zeros_init(("embed",)),
            name="fc2",
        )(h)
        return (x + h).astype(x.dtype), cls_attention


class Encoder(nn.Module):
    """The shared backbone: ``depth`` scanned blocks and a final LayerNorm.

    ``attention_layers`` picks the layers whose [CLS] attention makes Eq. 1: 'all' averages them
    (the paper), 'last' takes the last block's (A-CLIP). ``width`` must be a multiple of
    ``num_heads``: config/checks.py checks both for a config (``selection.layers``, ``model.*``).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    remat: str = "none"
    unroll_layers: bool = False
    attention_layers: str = "all"
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> EncoderOutput:
        blocks = scanned(Block, self.depth, self.remat, self.unroll_layers)(
            self.width, self.num_heads, self.mlp_dim, self.dtype, self.attention, name="blocks"
        )
        x, cls_attention = blocks(x)
        eq1 = cls_attention.mean(axis=0) if self.attention_layers == "all" else cls_attention[-1]
        return EncoderOutput(layer_norm("norm")(x), eq1)


class VisionTransformer(nn.Module):
    """Dual-tokenizer ViT (ViT-B/16 by default).

    ``__call__(x)`` with x [B, H, W] encodes X-rays; with x [B, D, H, W] it encodes volumes,
    optionally followed by the tokens of ``slices`` [B, k, h, w] (the 2D tokenizer). ``mask``
    [B, N] (True = masked) replaces those patch embeddings by the learned [MASK] embedding before
    position embeddings are added, as in iBOT. Inputs are in [0, 1]; both tokenizers standardise
    them with ``pixel_mean`` / ``pixel_std`` (see PatchEmbed). ``attention_layers``: see Encoder;
    ``attention``: see Block.
    """

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_2d: tuple[int, int] = (16, 16)
    patch_3d: tuple[int, int, int] = (4, 16, 16)
    image_size: tuple[int, int] = (224, 224)
    volume_size: tuple[int, int, int] = (32, 128, 128)
    in_chans: int = 1
    dtype: Dtype = jnp.float32
    remat: str = "none"
    unroll_layers: bool = False
    pixel_mean: float = 0.0
    pixel_std: float = 1.0
    attention_layers: str = "all"
    attention: str = "auto"

    def setup(self):
        self.embed_2d = PatchEmbed(
            self.width,
            self.patch_2d,
            tuple(s // p for s, p in zip(self.image_size, self.patch_2d, strict=True)),
            self.in_chans,
            self.dtype,
            self.pixel_mean,
            self.pixel_std,
        )
        self.embed_3d = PatchEmbed(
            self.width,
            self.patch_3d,
            tuple(s // p for s, p in zip(self.volume_size, self.patch_3d, strict=True)),
            1,
            self.dtype,
            self.pixel_mean,
            self.pixel_std,
        )
        self.cls_token = self.param(
            "cls_token",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (self.width,),
        )
        self.mask_token = self.param(
            "mask_token",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (self.width,),
        )
        self.encoder = Encoder(
            self.width,
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.remat,
            self.unroll_layers,
            self.attention_layers,
            self.attention,
        )

    def patch_tokens(
        self, x: jax.Array, slices: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Patch embeddings [B, N, D] and their position embeddings [N, D] for a sequence."""
        if x.ndim == 3:
            if slices is not None:
                raise ValueError("slices go with volumes [B, D, H, W], not with 2D images")
            embed = self.embed_2d
            return embed.tokens(x), embed.position(embed.grid_of(x.shape[1:]))
        if x.ndim != 4:
            raise ValueError(f"expected images [B, H, W] or volumes [B, D, H, W], got {x.shape}")
        tokens = [self.embed_3d.tokens(x)]
        positions = [self.embed_3d.position(self.embed_3d.grid_of(x.shape[1:]))]
        if slices is not None:
            batch, k = slices.shape[:2]
            slice_tokens = self.embed_2d.tokens(slices.reshape(batch * k, *slices.shape[2:]))
            tokens.append(slice_tokens.reshape(batch, -1, self.width))
            slice_pos = self.embed_2d.position(self.embed_2d.grid_of(slices.shape[2:]))
            positions.append(jnp.tile(slice_pos, (k, 1)))
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(positions, axis=0)

    def embed(
        self, x: jax.Array, slices: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """The encoder's input sequence [B, 1 + N, D]: [CLS], then masked patches + positions."""
        tokens, positions = self.patch_tokens(x, slices)
        if mask is not None:
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"mask shape {mask.shape} != token shape {tokens.shape[:2]}")
            tokens = jnp.where(mask[..., None], self.mask_token.astype(tokens.dtype), tokens)
        tokens = tokens + positions.astype(tokens.dtype)
        cls = jnp.broadcast_to(
            self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, self.width)
        )
        return jnp.concatenate([cls, tokens], axis=1)

    def __call__(
        self, x: jax.Array, slices: jax.Array | None = None, mask: jax.Array | None = None
    ) -> EncoderOutput:
        return self.encoder(self.embed(x, slices, mask))
