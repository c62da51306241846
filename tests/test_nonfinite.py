"""Non-finite loss or gradients: ``train.on_nonfinite=skip`` leaves the learned state untouched
inside the compiled step and counts the skip; ``stop`` (``train/loop.py``, shared by the
trainers) names the step, the terms and the last good checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pretrain import get_config
from tests.test_train_step import build, tiny_batch
from unimedi_jax.train.checkpoint import Checkpointer
from unimedi_jax.train.loop import NonFiniteLossError, NonFiniteWatch, check_finite
from unimedi_jax.trainers.pretraining import NONFINITE_REMEDY

LEARNED = ("params", "teacher", "opt_state", "center_cls", "center_patch")


def test_skip_keeps_the_state_on_a_nan_batch_and_counts_it():
    config = get_config("tiny")
    config.train.on_nonfinite = "skip"
    state, step = build(config)
    good = tiny_batch(config, ("image", "volume"))
    state, metrics = step(state, good)  # a real update first: the optimizer state is not zero
    assert int(metrics["nonfinite_skips"]) == 0
    bad = {**good, "volume": good["volume"].copy()}
    bad["volume"][1, 2, 3, 4] = np.nan
    before = jax.device_get(state)

    skipped, metrics = step(state, bad)
    assert not np.isfinite(metrics["loss"])
    assert int(metrics["nonfinite_skips"]) == int(skipped.nonfinite_skips) == 1
    for name in LEARNED:
        jax.tree.map(np.testing.assert_array_equal, getattr(skipped, name), getattr(before, name))
    assert int(skipped.step) == 2  # the schedule and the data move on
    assert not np.array_equal(skipped.rng, before.rng)

    after, metrics = step(skipped, good)
    assert np.isfinite(metrics["loss"]) and int(metrics["nonfinite_skips"]) == 1
    assert not np.array_equal(
        after.params["vision"]["cls_token"], before.params["vision"]["cls_token"]
    )


def test_after_a_skip_the_learning_rate_applied_is_the_one_of_the_step():
    """The schedule follows ``state.step`` (which advances on a skip), not the optimizer's own
    count (which a skip rolls back): with a learning rate that is nonzero at step 2 only, the
    update at step 2 moves the params and the one at step 3 does not."""
    config = get_config("tiny")
    config.train.on_nonfinite = "skip"
    state, step = build(config, lr=lambda count: jnp.where(count == 2, 1e-3, 0.0))
    good = tiny_batch(config, ("image", "volume"))
    bad = {**good, "volume": good["volume"].copy()}
    bad["volume"][0, 0, 0, 0] = np.nan
    state, _ = step(state, good)  # step 0: learning rate 0
    state, metrics = step(state, bad)  # step 1: skipped
    assert int(metrics["nonfinite_skips"]) == 1
    before = jax.device_get(state.params)
    state, metrics = step(state, good)  # step 2
    assert float(metrics["learning_rate"]) == pytest.approx(1e-3)
    moved = jax.device_get(state.params)
    assert not np.array_equal(moved["vision"]["cls_token"], before["vision"]["cls_token"])
    state, metrics = step(state, good)  # step 3
    assert float(metrics["learning_rate"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), moved)


@pytest.mark.parametrize("bad", ["loss_pcl", "grad_norm"])
def test_stop_names_the_step_the_terms_and_the_last_checkpoint(tmp_path, bad):
    checkpointer = Checkpointer(tmp_path, keep=1)
    checkpointer.save(5, {"w": np.zeros(2, np.float32)}, {"step": 5})
    checkpointer.wait()
    metrics = {"loss": 1.5, "loss_vl": 0.5, "loss_icl": 0.5, "loss_pcl": 0.5, "grad_norm": 2.0}
    check_finite(7, metrics, NONFINITE_REMEDY, checkpointer)
    metrics[bad] = float("inf") if bad == "grad_norm" else float("nan")
    with pytest.raises(NonFiniteLossError) as error:
        check_finite(7, metrics, NONFINITE_REMEDY, checkpointer)
    message = str(error.value)
    assert message.startswith("non-finite loss or gradients at step 7 (loss=1.5, ")
    assert f"{bad}={metrics[bad]}" in message
    assert f"The last good checkpoint is step 5 in {tmp_path}" in message
    assert "train.on_nonfinite=skip" in message


def test_without_checkpoints_the_message_names_the_epoch_and_the_remedy():
    with pytest.raises(NonFiniteLossError) as error:
        check_finite(13, {"loss": float("nan")}, "Lower it.", epoch="2/50")
    assert (
        str(error.value)
        == "non-finite loss or gradients at epoch 2/50, step 13 (loss=nan). Lower it."
    )


def test_watch_checks_each_step_once_the_next_is_dispatched():
    good, bad = {"loss": 1.0}, {"loss": float("inf")}
    watch = NonFiniteWatch(True, "Lower it.")
    watch.dispatched(1, good)
    watch.dispatched(2, bad)  # not read yet: the host does not wait for step 2
    with pytest.raises(NonFiniteLossError, match="at step 2 "):
        watch.dispatched(3, good)
    off = NonFiniteWatch(False, "Lower it.")  # 'skip': the compiled step handles it
    off.dispatched(1, bad)
    off.dispatched(2, good)
    off.check(1, bad)
