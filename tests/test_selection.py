"""Slice selection and token masks against naive numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimedi_jax.method import selection

GRID = (4, 2, 3)  # gd, gh, gw
DEPTH = 8  # pd = 2
TOKENS = 4 * 2 * 3


def _attention(seed: int, batch: int = 3, tokens: int = TOKENS) -> np.ndarray:
    x = np.random.default_rng(seed).random((batch, tokens)).astype(np.float32)
    return x / x.sum(axis=1, keepdims=True)


def _naive_slice_scores(attention, grid, depth):
    gd, gh, gw = grid
    pd = depth // gd
    out = np.zeros((attention.shape[0], depth))
    for b in range(attention.shape[0]):
        for i in range(depth):
            values = []
            for j in range(gd * gh * gw):
                zi = j // (gh * gw)
                if zi * pd <= i < (zi + 1) * pd:
                    values.append(attention[b, j])
            out[b, i] = np.mean(values)
    return out


def test_slice_scores_matches_naive_loop():
    attention = _attention(0)
    got = jax.jit(selection.slice_scores, static_argnums=(1, 2))(attention, GRID, DEPTH)
    assert got.shape == (3, DEPTH) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _naive_slice_scores(attention, GRID, DEPTH), rtol=1e-6)


def test_slice_scores_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        selection.slice_scores(_attention(0), GRID, 10)
    with pytest.raises(ValueError, match="grid"):
        selection.slice_scores(_attention(0, tokens=TOKENS - 1), GRID, DEPTH)


def test_attention_on_one_block_selects_its_slices():
    _, gh, gw = GRID
    attention = np.full((2, TOKENS), 1e-4, np.float32)
    attention[:, 3 * gh * gw : 4 * gh * gw] = 1.0  # only depth block 3 (slices 6, 7)
    scores = selection.slice_scores(attention, GRID, DEPTH)
    np.testing.assert_array_equal(selection.top_k_slices(scores, 2), [[6, 7], [6, 7]])


def test_top_k_slices_sorted_and_highest():
    scores = np.array([[0.1, 0.9, 0.3, 0.8, 0.0, 0.7], [5.0, 1.0, 4.0, 0.0, 3.0, 2.0]], np.float32)
    got = jax.jit(selection.top_k_slices, static_argnums=1)(scores, 3)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, [[1, 3, 5], [0, 2, 4]])


def test_gather_slices_equals_fancy_indexing():
    volumes = np.random.default_rng(1).random((2, DEPTH, 4, 5)).astype(np.float32)
    indices = np.array([[0, 3, 7], [2, 2, 5]], np.int32)
    got = jax.jit(selection.gather_slices)(volumes, indices)
    np.testing.assert_array_equal(got, volumes[np.arange(2)[:, None], indices])


def test_random_slices_distinct_sorted_in_range_deterministic():
    rng = jax.random.key(0)
    got = np.asarray(jax.jit(selection.random_slices, static_argnums=(1, 2, 3))(rng, 16, 10, 4))
    assert got.shape == (16, 4) and got.dtype == np.int32
    assert (got >= 0).all() and (got < 10).all()
    assert (np.diff(got, axis=1) > 0).all()  # sorted and distinct
    np.testing.assert_array_equal(got, selection.random_slices(rng, 16, 10, 4))
    assert not np.array_equal(got, selection.random_slices(jax.random.key(1), 16, 10, 4))


def test_select_slices_modes():
    attention = _attention(2)
    volumes = np.random.default_rng(3).random((3, DEPTH, 4, 4)).astype(np.float32)
    fn = jax.jit(selection.select_slices, static_argnames=("grid", "k", "mode"))
    indices, slices = fn(attention, volumes, grid=GRID, k=4, mode="attentive")
    expected = np.sort(
        np.argsort(-_naive_slice_scores(attention, GRID, DEPTH), kind="stable")[:, :4]
    )
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(slices, volumes[np.arange(3)[:, None], expected])

    indices, slices = fn(attention, volumes, grid=GRID, k=4, mode="random", rng=jax.random.key(0))
    assert slices.shape == (3, 4, 4, 4)
    np.testing.assert_array_equal(slices, volumes[np.arange(3)[:, None], np.asarray(indices)])


def test_oracle_slices_lie_inside_the_lesion_and_fill_up_at_random():
    lesion = np.zeros((3, DEPTH), bool)
    lesion[0, [1, 2, 5, 6, 7]] = True  # more lesion slices than k: k of them
    lesion[1, [3]] = True  # fewer: that one and random others
    volumes = np.random.default_rng(4).random((3, DEPTH, 2, 2)).astype(np.float32)
    fn = jax.jit(selection.select_slices, static_argnames=("grid", "k", "mode"))
    picks = []
    for seed in range(20):
        indices, slices = fn(
            _attention(0), volumes, GRID, 3, "oracle", jax.random.key(seed), lesion
        )
        indices = np.asarray(indices)
        assert (np.diff(indices, axis=1) > 0).all()
        np.testing.assert_array_equal(slices, volumes[np.arange(3)[:, None], indices])
        assert lesion[0, indices[0]].all() and 3 in indices[1]
        picks.append(indices)
    picks = np.stack(picks)
    assert len({tuple(p) for p in picks[:, 0]}) > 1  # not always the same lesion slices
    assert set(picks[:, 2].ravel()) == set(range(DEPTH))  # no lesion: any slice
    with pytest.raises(ValueError, match="lesion_slices"):
        selection.select_slices(_attention(0), volumes, GRID, 3, "oracle", jax.random.key(0))


def test_mode_errors_name_valid_modes():
    with pytest.raises(ValueError, match=r"attentive.*random.*oracle"):
        selection.select_slices(_attention(0), np.zeros((3, DEPTH, 2, 2)), GRID, 2, mode="top")
    with pytest.raises(ValueError, match=r"attentive.*random"):
        selection.token_mask(_attention(0), 0.5, mode="block")
    with pytest.raises(ValueError, match="rng"):
        selection.token_mask(_attention(0), 0.5, mode="random")


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75, 1.0])
def test_attentive_mask_keeps_top_attention_tokens(mask_ratio):
    attention = _attention(4, batch=4)  # distinct values
    mask = np.asarray(
        jax.jit(selection.attentive_token_mask, static_argnums=1)(attention, mask_ratio)
    )
    keep = round((1 - mask_ratio) * TOKENS)
    expected = np.ones_like(mask)
    for b, order in enumerate(np.argsort(-attention, axis=1)):
        expected[b, order[:keep]] = False
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(mask.sum(axis=1), TOKENS - keep)


@pytest.mark.parametrize("mode", ["attentive", "random"])
def test_per_part_mask_applies_the_ratio_to_each_part(mode):
    """``parts``: the 3D tokens and the slice tokens each keep round((1 - ratio) * n) of their
    own, even where one part's attention dwarfs the other's (one top-k over both would mask the
    weaker part entirely)."""
    attention = _attention(6, batch=4, tokens=10)
    attention[:, :4] += 10.0  # the first part (4 tokens) dominates
    mask = np.asarray(selection.token_mask(attention, 0.5, mode, jax.random.key(0), parts=(4, 6)))
    np.testing.assert_array_equal(mask[:, :4].sum(1), 2)
    np.testing.assert_array_equal(mask[:, 4:].sum(1), 3)
    if mode == "attentive":
        expected = np.ones_like(mask)
        for start, n in ((0, 4), (4, 6)):
            for b, order in enumerate(np.argsort(-attention[:, start : start + n], axis=1)):
                expected[b, start + order[: round(0.5 * n)]] = False
        np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError, match="parts"):
        selection.token_mask(attention, 0.5, mode, jax.random.key(0), parts=(4, 5))


def test_attentive_mask_ties_are_deterministic():
    mask = selection.attentive_token_mask(jnp.ones((2, 6)), 0.5)
    np.testing.assert_array_equal(mask, [[False] * 3 + [True] * 3] * 2)


def test_random_mask_exact_count_and_rng():
    fn = jax.jit(selection.token_mask, static_argnames=("mask_ratio", "mode"))
    attention = jnp.zeros((8, 10))
    mask = np.asarray(fn(attention, mask_ratio=0.7, mode="random", rng=jax.random.key(5)))
    np.testing.assert_array_equal(mask.sum(axis=1), 7)
    assert len({row.tobytes() for row in mask}) > 1  # samples differ
    again = selection.token_mask(attention, 0.7, "random", jax.random.key(5))
    np.testing.assert_array_equal(mask, again)
    other = selection.token_mask(attention, 0.7, "random", jax.random.key(6))
    assert not np.array_equal(mask, other)


def test_mask_ratio_out_of_range():
    with pytest.raises(ValueError, match="mask_ratio"):
        selection.attentive_token_mask(jnp.ones((1, 4)), 1.5)


@pytest.mark.parametrize(("ratio", "parts"), [(0.5, None), (0.3, (10, 7)), (0.0, None)])
def test_masked_positions_are_the_masks_true_entries_in_order(ratio, parts):
    """``num_masked`` is the count ``token_mask`` masks in every sample, and
    ``masked_positions`` lists exactly those tokens, ascending; an all-False mask (masking off)
    gets the first positions, which its weights drop."""
    attention = jax.random.uniform(jax.random.key(3), (4, 17))
    mask = np.asarray(selection.token_mask(attention, ratio, parts=parts))
    count = selection.num_masked(17, ratio, parts)
    assert (mask.sum(1) == count).all()
    positions = np.asarray(selection.masked_positions(jnp.asarray(mask), count))
    expected = np.stack([np.flatnonzero(row) for row in mask])
    np.testing.assert_array_equal(positions, expected.reshape(4, count))
    off = selection.masked_positions(jnp.zeros((4, 17), bool), count)
    np.testing.assert_array_equal(off, np.broadcast_to(np.arange(count), (4, count)))
