"""Attentive slice selection (paper Sec. 3.2) and token masking (Sec. 3.4).

Pure jnp functions with static shapes, meant to run inside the jitted train step. The [CLS]
attention v (Eq. 1) over the 3D patch tokens picks the slices that become the pseudo 2D image of a
volume, and the same kind of attention decides which tokens the student keeps unmasked. The
'random' modes are the ablations of Table 7; slice selection's 'oracle' mode (phantoms only)
picks slices by the ground-truth lesion slices, an upper bound for any selector.

Token layout: a volume [D, H, W] cut into non-overlapping (pd, ph, pw) patches gives a grid
(gd, gh, gw), flattened row-major, so token j = (zi * gh + yi) * gw + xi covers slices
zi * pd ... zi * pd + pd - 1.

Under jit, grid, depth, k, mask_ratio and mode are static (they fix output shapes or branches).
"""

import itertools

import jax
import jax.numpy as jnp

MODES = ("attentive", "random")  # token masking
SELECTION_MODES = (*MODES, "oracle")  # slice selection


def _check_mode(mode: str, valid: tuple[str, ...] = MODES) -> None:
    if mode not in valid:
        raise ValueError(f"Unknown selection mode {mode!r}; valid modes are {valid}.")


def _require_rng(rng: jax.Array | None, what: str) -> jax.Array:
    if rng is None:
        raise ValueError(f"mode='random' for {what} needs an rng key; got rng=None.")
    return rng


def slice_scores(attention_3d: jax.Array, grid: tuple[int, int, int], depth: int) -> jax.Array:
    """Eq. 2: each slice's score is the mean attention of the tokens whose voxels contain it.

    attention_3d: [B, gd*gh*gw] [CLS] attention over the 3D patch tokens. Returns [B, depth]
    float32. All slices inside one depth block share that block's score.
    """
    gd, gh, gw = grid
    if attention_3d.shape[-1] != gd * gh * gw:
        raise ValueError(
            f"attention_3d has {attention_3d.shape[-1]} tokens but grid {grid} has "
            f"{gd * gh * gw}; pass the attention over the 3D patch tokens only."
        )
    if depth % gd:
        raise ValueError(
            f"depth {depth} is not a multiple of the token grid depth {gd}; the patch depth "
            "must divide the volume depth."
        )
    attention = attention_3d.astype(jnp.float32).reshape(-1, gd, gh * gw)
    block_scores = attention.mean(axis=-1)
    return jnp.repeat(block_scores, depth // gd, axis=1)


def top_k_slices(scores: jax.Array, k: int) -> jax.Array:
    """Indices [B, k] (int32) of the k highest-scoring slices, ascending to keep anatomical order.

    Ties go to the lower slice index (`jax.lax.top_k` semantics), so selection is deterministic.
    """
    _, indices = jax.lax.top_k(scores, k)
    return jnp.sort(indices, axis=-1).astype(jnp.int32)


def random_slices(rng: jax.Array, batch: int, depth: int, k: int) -> jax.Array:
    """Ablation: k distinct slices per volume drawn uniformly, ascending, int32 [B, k]."""
    return top_k_slices(jax.random.uniform(rng, (batch, depth)), k)


def oracle_slices(rng: jax.Array, lesion_slices: jax.Array, k: int) -> jax.Array:
    """Upper bound: k slices per volume inside its lesions (bool [B, D] ground truth), drawn at
    random among them and topped up with random other slices where fewer than k hold a
    lesion; ascending, int32 [B, k]."""
    noise = jax.random.uniform(rng, lesion_slices.shape)
    return top_k_slices(lesion_slices.astype(jnp.float32) + 0.5 * noise, k)


def gather_slices(volumes: jax.Array, indices: jax.Array) -> jax.Array:
    """Slices [B, k, H, W] picked from volumes [B, D, H, W] by per-sample indices [B, k]."""
    return jax.vmap(lambda volume, idx: volume[idx])(volumes, indices)


def select_slices(
    attention_3d: jax.Array,
    volumes: jax.Array,
    grid: tuple[int, int, int],
    k: int,
    mode: str = "attentive",
    rng: jax.Array | None = None,
    lesion_slices: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pick k slices per volume ('attentive' by Eq. 2 scores, 'random', or 'oracle' inside the
    ground-truth ``lesion_slices`` [B, D]); (indices, slices)."""
    _check_mode(mode, SELECTION_MODES)
    batch, depth = volumes.shape[:2]
    if mode == "attentive":
        indices = top_k_slices(slice_scores(attention_3d, grid, depth), k)
    elif mode == "random":
        indices = random_slices(_require_rng(rng, "slice selection"), batch, depth, k)
    else:
        if lesion_slices is None:
            raise ValueError("mode='oracle' needs the ground-truth lesion_slices [B, D].")
        indices = oracle_slices(_require_rng(rng, "slice selection"), lesion_slices, k)
    return indices, gather_slices(volumes, indices)


def _num_kept(num_tokens: int, mask_ratio: float) -> int:
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1]; got {mask_ratio}.")
    return round((1.0 - mask_ratio) * num_tokens)


def num_masked(num_tokens: int, mask_ratio: float, parts: tuple[int, ...] | None = None) -> int:
    """How many of ``num_tokens`` tokens ``token_mask`` masks in every sample: a static count."""
    return sum(n - _num_kept(n, mask_ratio) for n in parts or (num_tokens,))


def masked_positions(mask: jax.Array, count: int) -> jax.Array:
    """Indices [B, count] (int32, ascending) of the masked tokens of ``mask`` [B, P] that holds
    ``count`` per sample (``num_masked``), so that only those tokens need to be computed on; a
    mask with fewer (masking off) fills up with unmasked positions, which its weights drop."""
    _, indices = jax.lax.top_k(mask.astype(jnp.int32), count)  # ties: the lower index first
    return indices.astype(jnp.int32)


def attentive_token_mask(attention: jax.Array, mask_ratio: float) -> jax.Array:
    """Mask [B, P] (True = masked) keeping the round((1 - ratio) * P) highest-attention tokens.

    Exactly that many tokens stay visible in every sample, so the masked count is static; ties
    keep the lower token index.
    """
    batch, num_tokens = attention.shape
    _, kept = jax.lax.top_k(attention.astype(jnp.float32), _num_kept(num_tokens, mask_ratio))
    visible = jnp.zeros((batch, num_tokens), bool).at[jnp.arange(batch)[:, None], kept].set(True)
    return ~visible


def token_mask(
    attention: jax.Array,
    mask_ratio: float,
    mode: str = "attentive",
    rng: jax.Array | None = None,
    parts: tuple[int, ...] | None = None,
) -> jax.Array:
    """Student-input mask [B, P] by mode 'attentive' (keep high attention) or 'random' (the
    ablation: uniform scores, so the same per-sample count as the attentive mask).

    ``parts`` (token counts summing to P, e.g. a volume's 3D tokens then its slice tokens)
    applies the ratio within each run of tokens separately (``masking.per_part``): one top-k over
    the whole sequence can mask a part whose attention is low almost entirely.
    """
    _check_mode(mode)
    batch, num_tokens = attention.shape
    if mode == "random":
        attention = jax.random.uniform(_require_rng(rng, "token masking"), (batch, num_tokens))
    if parts is None:
        return attentive_token_mask(attention, mask_ratio)
    if sum(parts) != num_tokens:
        raise ValueError(f"mask parts {parts} do not add up to the {num_tokens} tokens.")
    bounds = [sum(parts[:i]) for i in range(len(parts) + 1)]
    return jnp.concatenate(
        [
            attentive_token_mask(attention[:, start:end], mask_ratio)
            for start, end in itertools.pairwise(bounds)
        ],
        axis=1,
    )
