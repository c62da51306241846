"""Linear probe: learns separable data, early stopping, best-epoch head, subsampling, sklearn."""

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from unimedi_jax.evaluation import linear_probe as lp

D = 16


def _labels(task, rng, n):
    if task == "multilabel":
        return (rng.random((n, 3)) < 0.4).astype(np.int64)
    return rng.integers(0, 2 if task == "binary" else 4, n)


def _split(task, rng, n, shift=4.0):
    """Each positive label (or the class) shifts its own feature by `shift` noise stds; a global
    offset and scale give standardisation work to do."""
    y = _labels(task, rng, n)
    z = rng.normal(size=(n, D))
    if task == "multiclass":
        z[np.arange(n), y] += shift
    else:
        z[:, :3] += shift * y.reshape(n, -1)
    return (z * 5.0 + 3.0).astype(np.float32), y


def _splits(task, seed=0, n_train=1000):
    rng = np.random.default_rng(seed)
    return {
        name: _split(task, rng, n) for name, n in (("train", n_train), ("val", 300), ("test", 600))
    }


@pytest.mark.parametrize("task", lp.TASKS)
def test_probe_learns_separable_data(task):
    data = _splits(task)
    result = lp.train_linear_probe(*data["train"], *data["val"], task, lp.ProbeConfig())
    got = lp.evaluate_linear_probe(result, *data["test"], task)
    assert got["auroc"] > 0.95
    if task == "multiclass":
        assert got["accuracy"] > 0.9
    assert np.isfinite(got["loss"])


def test_early_stopping_when_validation_loss_rises():
    data = _splits("binary")
    val_x, val_y = data["val"]
    config = lp.ProbeConfig(patience=4)
    result = lp.train_linear_probe(*data["train"], val_x, 1 - val_y, "binary", config)
    val_losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == 0 and val_losses[-1] > val_losses[0]
    assert len(result.history) == result.best_epoch + 1 + config.patience < config.max_epochs


def _val_loss(result, val_x, val_y):
    return lp.evaluate_linear_probe(result, val_x, val_y)["loss"]


def test_returns_the_best_validation_epoch():
    # Few noisy training rows in many dimensions: the head overfits, so the validation loss falls
    # and then rises, and the best epoch lies strictly inside the run.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ (rng.random(40) < 0.25)).astype(np.int64)
    val_x = rng.normal(size=(200, 64)).astype(np.float32)
    val_y = (val_x[:, 0] > 0).astype(np.int64)
    config = lp.ProbeConfig(learning_rate=1e-2, batch_size=8, patience=5)
    result = lp.train_linear_probe(x, y, val_x, val_y, "binary", config)
    val_losses = np.array([h["val_loss"] for h in result.history])
    assert 0 < result.best_epoch < len(val_losses) - 1
    assert result.best_epoch == int(np.argmin(val_losses))
    assert _val_loss(result, val_x, val_y) == pytest.approx(val_losses.min(), rel=1e-5)


def test_training_is_deterministic_for_a_seed():
    data = _splits("multiclass")
    config = lp.ProbeConfig(max_epochs=5)
    first = lp.train_linear_probe(*data["train"], *data["val"], "multiclass", config)
    again = lp.train_linear_probe(*data["train"], *data["val"], "multiclass", config)
    other = lp.train_linear_probe(
        *data["train"], *data["val"], "multiclass", lp.ProbeConfig(max_epochs=5, seed=1)
    )
    assert first.history == again.history
    jax.tree.map(np.testing.assert_array_equal, first.params, again.params)
    assert not np.allclose(first.params["kernel"], other.params["kernel"])


def test_multiclass_accuracy_close_to_sklearn_logistic_regression():
    # Overlapping classes, so accuracy is well below 1 and the comparison means something.
    rng = np.random.default_rng(7)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        _split("multiclass", rng, n, shift=1.0) for n in (1000, 300, 600)
    )
    result = lp.train_linear_probe(train_x, train_y, val_x, val_y, "multiclass")
    probe_accuracy = lp.evaluate_linear_probe(result, test_x, test_y)["accuracy"]

    mean, std = train_x.mean(0), train_x.std(0)
    sk = LogisticRegression(max_iter=2000).fit((train_x - mean) / std, train_y)
    sk_accuracy = sk.score((test_x - mean) / std, test_y)
    assert 0.4 < sk_accuracy < 0.9
    assert probe_accuracy == pytest.approx(sk_accuracy, abs=0.03)


def test_subsample_multiclass_is_stratified():
    labels = np.repeat([0, 1, 2], [1000, 50, 5])
    rows = lp.subsample(labels, 0.01, seed=0, task="multiclass")
    assert np.bincount(labels[rows]).tolist() == [10, 1, 1]
    assert np.all(np.diff(rows) > 0)
    ten = lp.subsample(labels, 0.1, seed=0, task="multiclass")
    assert np.bincount(labels[ten]).tolist() == [100, 5, 1]
    np.testing.assert_array_equal(rows, lp.subsample(labels, 0.01, seed=0, task="multiclass"))
    assert not np.array_equal(rows, lp.subsample(labels, 0.01, seed=1, task="multiclass"))
    np.testing.assert_array_equal(lp.subsample(labels, 1.0, 0, "multiclass"), np.arange(1055))


def test_subsample_multilabel_covers_every_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((2000, 6)) < [0.3, 0.2, 0.1, 0.05, 0.002, 0.0]).astype(np.int64)
    rows = lp.subsample(labels, 0.01, seed=0, task="multilabel")
    assert rows.size == 20 and len(set(rows.tolist())) == 20
    assert labels[rows, :5].any(axis=0).all()  # Label 5 has no positive anywhere.
    with pytest.raises(ValueError, match="fraction"):
        lp.subsample(labels, 0.0, seed=0, task="multilabel")


def test_run_probe_over_fractions():
    data = _splits("multiclass")
    got = lp.run_probe(data, "multiclass", fractions=(0.1, 1.0))
    assert set(got) == {0.1, 1.0}
    assert got[1.0]["n_train"] == 1000 and 96 <= got[0.1]["n_train"] <= 104
    assert got[1.0]["accuracy"] > 0.9 and got[0.1]["accuracy"] > 0.5
    assert {"accuracy", "auroc", "loss", "best_epoch", "epochs"} <= set(got[0.1])


def test_shape_and_task_errors():
    x = np.zeros((10, D), np.float32)
    with pytest.raises(ValueError, match="train_y must have 2 dims"):
        lp.train_linear_probe(x, np.zeros(10), x, np.zeros((10, 2)), "multilabel")
    with pytest.raises(ValueError, match="val_x has 3 features"):
        lp.train_linear_probe(x, np.zeros(10, int), x[:, :3], np.zeros(10, int), "binary")
    with pytest.raises(ValueError, match="Unknown probe task"):
        lp.train_linear_probe(x, np.zeros(10, int), x, np.zeros(10, int), "regression")
    result = lp.ProbeResult(
        {"kernel": np.zeros((D, 1)), "bias": np.zeros(1)}, np.zeros(D), np.ones(D), "binary", 0
    )
    with pytest.raises(ValueError, match="trained for task 'binary'"):
        lp.evaluate_linear_probe(result, x, np.arange(10) % 2, "multiclass")
    with pytest.raises(ValueError, match="test_y must have 1 dims"):
        lp.evaluate_linear_probe(result, x, np.zeros((10, 1)))


@pytest.mark.parametrize("task", lp.TASKS)
def test_evaluate_head_on_raw_features_matches_sklearn(task):
    """Fine-tuning's scoring: a head on unstandardised features, against sklearn's metrics and
    a numpy loss."""
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    rng = np.random.default_rng(3)
    x, y = _split(task, rng, 200)
    outputs = 4 if task == "multiclass" else (3 if task == "multilabel" else 1)
    head = {
        "kernel": rng.normal(scale=0.05, size=(D, outputs)).astype(np.float32),
        "bias": rng.normal(size=outputs).astype(np.float32),
    }
    got = lp.evaluate_head(head, x, y, task)
    logits = x.astype(np.float64) @ head["kernel"] + head["bias"]
    if task == "multiclass":
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        assert got["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
        assert got["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6)
        assert got["loss"] == pytest.approx(log_loss(y, probs), rel=1e-4)
        return
    probs = 1 / (1 + np.exp(-logits))
    columns = y.reshape(len(y), -1)
    auroc = np.mean([roc_auc_score(columns[:, c], probs[:, c]) for c in range(outputs)])
    loss = np.mean([log_loss(columns[:, c], probs[:, c]) for c in range(outputs)])
    assert got["auroc"] == pytest.approx(auroc, abs=1e-6)
    assert got["loss"] == pytest.approx(loss, rel=1e-4)
