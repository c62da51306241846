"""TrainState and the optimizer: everything the compiled step reads and writes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

from unimedi_jax.models.unimedi import TEACHER_KEYS

# Leaves that AdamW must not decay: biases, norm scales, embeddings and tokens, the logit scale.
NO_DECAY_LEAVES = frozenset(
    {"bias", "scale", "embedding", "pos_embed", "cls_token", "mask_token", "value"}
)


class TrainState(struct.PyTreeNode):
    """Student params, EMA teacher (vision + DINO head), AdamW state, DINO/iBOT centers, rng,
    and how many updates were skipped for a non-finite loss (``train.on_nonfinite=skip``)."""

    step: jax.Array
    params: dict
    teacher: dict
    opt_state: optax.OptState
    center_cls: jax.Array
    center_patch: jax.Array
    rng: jax.Array  # raw uint32 key data, so checkpoints hold a plain array
    nonfinite_skips: jax.Array  # int32 scalar


def learning_rate_schedule(
    peak: float, init: float, end: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Linear warm-up from ``init`` to ``peak``, then cosine decay to ``end`` at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=init,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=end,
    )


def weight_decay_mask(params: dict) -> dict:
    """True for the leaves AdamW decays: weight matrices, not biases/norms/embeddings."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] not in NO_DECAY_LEAVES for k in flat})


def make_optimizer(train_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, masked) after optional global-norm clipping."""
    adamw = optax.adamw(
        schedule,
        b1=train_cfg.b1,
        b2=train_cfg.b2,
        weight_decay=train_cfg.weight_decay,
        mask=weight_decay_mask,
    )
    if train_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adamw)
    return adamw


def teacher_subtree(params: dict) -> dict:
    """The part of the student that the EMA teacher mirrors."""
    return {k: params[k] for k in TEACHER_KEYS}


def init_train_state(
    params: dict, tx: optax.GradientTransformation, dino_out_dim: int, rng: jax.Array
) -> TrainState:
    """A fresh state whose teacher starts as a copy of the student (as in DINO)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        teacher=jax.tree.map(jnp.copy, teacher_subtree(params)),
        opt_state=tx.init(params),
        center_cls=jnp.zeros((dino_out_dim,), jnp.float32),
        center_patch=jnp.zeros((dino_out_dim,), jnp.float32),
        rng=jax.random.key_data(rng),
        nonfinite_skips=jnp.zeros((), jnp.int32),
    )
