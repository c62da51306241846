"""Building blocks shared by the vision and text towers: scanned layers, remat, inits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

# model.remat -> the jax.checkpoint policy of the rematerialised blocks (None: save nothing,
# full remat); "none" does not remat. config/checks.py checks a config's name against these.
_CHECKPOINT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_POLICIES = ("none", *_CHECKPOINT_POLICIES)

# model.attention: auto | xla | cudnn (config/checks.py checks a config's name against these).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# The dtypes cuDNN's flash attention takes.
_FLASH_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_implementation(name: str, dtype: jnp.dtype | type) -> str:
    """``model.attention`` resolved for inputs of ``dtype``: 'auto' is cuDNN's flash kernel on a
    GPU in bfloat16/float16 (no [B, heads, N, N] logits in memory), XLA's fusion elsewhere."""
    if name != "auto":
        return name
    flash = jax.default_backend() == "gpu" and jnp.dtype(dtype) in _FLASH_DTYPES
    return "cudnn" if flash else "xla"


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str, mask: jax.Array | None = None
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over [B, N, heads, d] inputs by ``model.attention``; ``mask``
    [B, 1 or heads, 1 or N, N] (True: attend). cuDNN takes a mask only at full [N, N] size."""
    implementation = attention_implementation(implementation, q.dtype)
    if implementation == "cudnn" and mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def scanned(
    block_cls: type[nn.Module], depth: int, remat: str, unroll: bool = False
) -> type[nn.Module]:
    """Wraps a block (carry, *broadcast) -> (carry, per_layer_out) in nn.scan over ``depth``.

    Scanning keeps compile time flat in depth; the layer axis of every parameter is named
    'layers' so sharding rules can leave it unsharded. ``unroll`` emits the ``depth`` layers one
    after another instead of a loop, with the same stacked parameters: longer compiles, and a
    step XLA may schedule better (see ``python -m unimedi_jax.benchmark --compare_unrolled``).
    """
    if remat != "none":
        block_cls = nn.remat(block_cls, prevent_cse=False, policy=_CHECKPOINT_POLICIES[remat])
    return nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=depth,
        unroll=depth if unroll else 1,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def dense_init(names: tuple[str | None, ...]):
    """Xavier-uniform kernel init carrying logical axis names (ViT/BERT style)."""
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)


def zeros_init(names: tuple[str | None, ...]):
    """Zeros init carrying logical axis names (biases)."""
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones_init(names: tuple[str | None, ...]):
    """Ones init carrying logical axis names (norm scales)."""
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)
