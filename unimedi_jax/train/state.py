"""TrainState and the optimizer: everything the compiled step reads and writes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

from unimedi_jax.models.unimedi import TEACHER_KEYS, UniMedI, init_inputs

# Modules built by layers.scanned: their leaves stack one parameter per layer on axis 0.
SCANNED_MODULES = frozenset({"blocks", "layers"})
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


def scale_by_step_schedule(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """optax's ``scale_by_learning_rate(schedule)`` (same state, so checkpoints still load),
    evaluated at ``update(..., step=state.step)`` when given: a skipped non-finite step rolls
    the optimizer state back, its count with it, while the train step's counter moves on."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        count = state.count if step is None else step
        step_size = -1 * schedule(count)
        updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(count))

    return optax.GradientTransformationExtraArgs(init, update)


def clip_by_param_norm(max_norm: float) -> optax.GradientTransformation:
    """DINO's ``clip_gradients``: each parameter's gradient scaled to norm ``max_norm`` when
    above it. A leaf of a scanned stack ([depth, ...]) holds one parameter per layer."""

    def clip(path, g):
        stacked = any(getattr(key, "key", None) in SCANNED_MODULES for key in path)
        axes = tuple(range(1, g.ndim)) if stacked else None
        norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True))
        coef = max_norm / (norm + 1e-6)
        return jnp.where(coef < 1, g * coef, g).astype(g.dtype)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, masked) after optional clipping: of the global gradient
    norm, or of each parameter's (``train.clip_mode``). Its update takes ``step=`` to evaluate the
    schedule at (``scale_by_step_schedule``)."""
    adamw = optax.chain(
        optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2),
        optax.add_decayed_weights(train_cfg.weight_decay, weight_decay_mask),
        scale_by_step_schedule(schedule),
    )
    if train_cfg.grad_clip_norm <= 0:
        return adamw
    # Fine-tuning configs have no clip_mode: they clip the global norm.
    if train_cfg.get("clip_mode", "global") == "per_param":
        return optax.chain(clip_by_param_norm(train_cfg.grad_clip_norm), adamw)
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adamw)


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


def state_initializer(model: UniMedI, tx: optax.GradientTransformation, config):
    """rng -> the initial train state of ``model`` for ``config``: what training creates
    sharded and the resume check traces for shapes. Its params stay boxed with their logical
    axes, so the optimizer state inherits them, hence their sharding."""

    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init(init_rng, *init_inputs(config))
        return init_train_state(variables["params"], tx, config.model.dino_out_dim, state_rng)

    return init
