"""Linear probe on frozen features (paper Sec. 4.2 and appendix, "linear classification").

A randomly initialised linear head is trained on fixed encoder features with AdamW (lr 5e-4,
weight decay 1e-6), batch 48, for up to 50 epochs; training stops once the validation loss has
not improved for 10 consecutive epochs, and the head of the epoch with the lowest validation loss
is the one tested. The 1% / 10% / 100% label-fraction settings subsample the training split only.

Tasks: 'multilabel' (labels [N, C] multi-hot, sigmoid BCE, mean AUROC), 'binary' (labels [N] in
{0, 1}, one sigmoid output, AUROC) and 'multiclass' (labels [N] int, softmax CE, accuracy and
one-vs-rest AUROC).

Features are standardised with the mean and std of the training rows the head is fitted on (the
subsample at a label fraction), so one learning rate suits every encoder's feature scale and no
statistic leaks from validation or test data. Each epoch is one jitted `lax.scan` over batches;
the partial last batch is padded and masked out of the loss.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unimedi_jax.evaluation import metrics

TASKS = ("multilabel", "binary", "multiclass")
_STD_FLOOR = 1e-6  # Constant features are centred, not blown up.

Params = dict[str, jax.Array]


@dataclass(frozen=True)
class ProbeConfig:
    """Optimisation settings of the probe; defaults are the paper's appendix values."""

    learning_rate: float = 5e-4
    weight_decay: float = 1e-6
    batch_size: int = 48
    max_epochs: int = 50
    patience: int = 10
    seed: int = 0


@dataclass
class ProbeResult:
    """The best-validation head, the statistics its inputs are standardised with, and the log.

    params holds numpy 'kernel' [D, C] and 'bias' [C] (C = 1 for 'binary'). history holds one
    {'epoch', 'train_loss', 'val_loss'} dict per epoch run; best_epoch indexes it (0-based).
    """

    params: dict[str, np.ndarray]
    mean: np.ndarray
    std: np.ndarray
    task: str
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown probe task {task!r}; valid tasks are {TASKS}.")


def _check_features(x: np.ndarray, y: np.ndarray, task: str, name: str) -> np.ndarray:
    """Validate one split; returns labels as float32 [N, C] (BCE tasks) or int32 [N]."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{name}_x must be [N, D] features, got shape {x.shape}.")
    expected_ndim = 2 if task == "multilabel" else 1
    if y.ndim != expected_ndim or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name}_y must have {expected_ndim} dims and {x.shape[0]} rows (one per {name}_x "
            f"row) for task {task!r}, got shape {y.shape}."
        )
    if task == "multiclass":
        if not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0:
            raise ValueError(f"{name}_y must hold non-negative integer classes for 'multiclass'.")
        return y.astype(np.int32)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name}_y must be 0/1 for task {task!r}.")
    return y.astype(np.float32).reshape(y.shape[0], -1)


def _num_outputs(task: str, labels: Sequence[np.ndarray]) -> int:
    if task == "multiclass":
        return int(max(y.max(initial=0) for y in labels)) + 1
    return labels[0].shape[1]


def _apply(params: Params, x: jax.Array) -> jax.Array:
    return x @ params["kernel"] + params["bias"]


def _loss_per_example(logits: jax.Array, y: jax.Array, task: str) -> jax.Array:
    if task == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return optax.sigmoid_binary_cross_entropy(logits, y).mean(axis=-1)


def _init_params(rng: np.random.Generator, in_dim: int, out_dim: int) -> Params:
    """Normal(0, 0.01) kernel and zero bias, the DINO / MAE linear-probe init.

    A small fixed scale keeps the random init from outweighing what short runs (1% of the
    labels) learn; at D = 768 it is close to PyTorch's nn.Linear default anyway.
    """
    kernel = 0.01 * rng.standard_normal((in_dim, out_dim), np.float32)
    return {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((out_dim,), jnp.float32)}


def _batch_plan(rng: np.random.Generator, n: int, batch_size: int):
    """A shuffled epoch as [num_batches, batch] indices and 0/1 weights for the padding."""
    num_batches = -(-n // batch_size)
    order = np.zeros(num_batches * batch_size, np.int32)
    order[:n] = rng.permutation(n)
    weights = np.zeros(num_batches * batch_size, np.float32)
    weights[:n] = 1.0
    shape = (num_batches, batch_size)
    return order.reshape(shape), weights.reshape(shape)


def _optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def _batch_loss(params: Params, x: jax.Array, y: jax.Array, weights: jax.Array, task: str):
    losses = _loss_per_example(_apply(params, x), y, task)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@partial(jax.jit, static_argnames=("task", "learning_rate", "weight_decay"))
def _train_epoch(params, opt_state, x, y, order, weights, *, task, learning_rate, weight_decay):
    """One pass over the batches of `order`; returns the new state and the epoch's mean loss.

    Module-level with static hyperparameters so repeated probes of one shape reuse the compile.
    """
    optimizer = _optimizer(learning_rate, weight_decay)

    def step(carry, batch):
        params, opt_state = carry
        idx, w = batch
        loss, grads = jax.value_and_grad(_batch_loss)(params, x[idx], y[idx], w, task)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss * jnp.sum(w)

    (params, opt_state), weighted = jax.lax.scan(step, (params, opt_state), (order, weights))
    return params, opt_state, jnp.sum(weighted) / jnp.sum(weights)


@partial(jax.jit, static_argnames="task")
def _mean_loss(params: Params, x: jax.Array, y: jax.Array, *, task: str) -> jax.Array:
    return _loss_per_example(_apply(params, x), y, task).mean()


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> jax.Array:
    return jnp.asarray((np.asarray(x, np.float32) - mean) / std)


def train_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    task: str,
    config: ProbeConfig | None = None,
    num_classes: int | None = None,
) -> ProbeResult:
    """Fit a linear head with early stopping on validation loss; return the best epoch's head.

    num_classes ('multiclass' only) defaults to 1 + the largest label in train_y and val_y; pass
    it when a class may be missing from both, e.g. after subsampling.
    """
    _check_task(task)
    config = config or ProbeConfig()
    train_labels = _check_features(train_x, train_y, task, "train")
    val_labels = _check_features(val_x, val_y, task, "val")
    if np.shape(val_x)[1] != np.shape(train_x)[1]:
        raise ValueError(
            f"val_x has {np.shape(val_x)[1]} features but train_x has {np.shape(train_x)[1]}."
        )
    out_dim = num_classes or _num_outputs(task, [train_labels, val_labels])
    if task == "multiclass" and _num_outputs(task, [train_labels, val_labels]) > out_dim:
        raise ValueError(f"train_y or val_y holds a class >= num_classes={out_dim}.")
    if task != "multiclass" and val_labels.shape[1] != out_dim:
        raise ValueError(f"val_y has {val_labels.shape[1]} label columns, train_y has {out_dim}.")

    train_np = np.asarray(train_x, np.float32)
    mean = train_np.mean(axis=0)
    std = np.maximum(train_np.std(axis=0), _STD_FLOOR)
    x, y = _standardise(train_np, mean, std), jnp.asarray(train_labels)
    vx, vy = _standardise(val_x, mean, std), jnp.asarray(val_labels)

    hyper = {"learning_rate": config.learning_rate, "weight_decay": config.weight_decay}
    rng = np.random.default_rng(config.seed)  # Init, then the batch order of every epoch.
    params = _init_params(rng, x.shape[1], out_dim)
    opt_state = _optimizer(**hyper).init(params)
    batch_size = min(config.batch_size, x.shape[0])

    best = (np.inf, 0, params)  # (val_loss, epoch, params)
    history = []
    for epoch in range(config.max_epochs):
        order, weights = _batch_plan(rng, x.shape[0], batch_size)
        params, opt_state, train_loss = _train_epoch(
            params, opt_state, x, y, order, weights, task=task, **hyper
        )
        val_loss = float(_mean_loss(params, vx, vy, task=task))
        history.append({"epoch": epoch, "train_loss": float(train_loss), "val_loss": val_loss})
        if val_loss < best[0]:
            best = (val_loss, epoch, params)
        elif epoch - best[1] >= config.patience:
            break
    _, best_epoch, best_params = best
    return ProbeResult(jax.device_get(best_params), mean, std, task, best_epoch, history)


@partial(jax.jit, static_argnames="task")
def _probabilities(params: Params, x: jax.Array, *, task: str) -> jax.Array:
    logits = _apply(params, x)
    return jax.nn.softmax(logits, axis=-1) if task == "multiclass" else jax.nn.sigmoid(logits)


def _test_metrics(params: Params, features: jax.Array, labels: np.ndarray, task: str):
    loss = float(_mean_loss(params, features, jnp.asarray(labels), task=task))
    scores = np.asarray(_probabilities(params, features, task=task))
    if task == "multiclass":
        return {
            "accuracy": metrics.accuracy(labels, scores),
            "auroc": metrics.multiclass_auroc(labels, scores),
            "loss": loss,
        }
    if task == "binary":
        return {"auroc": metrics.auroc(labels[:, 0], scores[:, 0]), "loss": loss}
    return {"auroc": metrics.mean_auroc(labels, scores)[0], "loss": loss}


def evaluate_linear_probe(
    result: ProbeResult, test_x: np.ndarray, test_y: np.ndarray, task: str | None = None
) -> dict[str, float]:
    """Test metrics of a trained head: {'auroc', 'loss'}, plus 'accuracy' for multiclass.

    task defaults to the one the head was trained for; passing a different one is an error.
    """
    if task is not None and task != result.task:
        raise ValueError(f"The probe was trained for task {result.task!r}, not {task!r}.")
    labels = _check_features(test_x, test_y, result.task, "test")
    features = _standardise(test_x, result.mean, result.std)
    return _test_metrics(result.params, features, labels, result.task)


def evaluate_head(
    head: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, task: str
) -> dict[str, float]:
    """The same metrics for a linear head ('kernel' [D, C], 'bias' [C]) on raw features:
    fine-tuning's head, trained with its encoder on unstandardised [CLS] features."""
    _check_task(task)
    labels = _check_features(x, y, task, "test")
    return _test_metrics(head, jnp.asarray(np.asarray(x, np.float32)), labels, task)


def _take_per_group(rng: np.random.Generator, members: np.ndarray, fraction: float) -> np.ndarray:
    count = min(max(round(fraction * members.size), 1), members.size)
    return rng.choice(members, size=count, replace=False)


def _subsample_multilabel(labels: np.ndarray, fraction: float, rng: np.random.Generator):
    """Cover every label that has a positive (rarest first), then fill up uniformly at random."""
    target = max(round(fraction * labels.shape[0]), 1)
    chosen = np.zeros(labels.shape[0], bool)
    for column in np.argsort(labels.sum(axis=0), kind="stable"):
        positives = np.flatnonzero(labels[:, column])
        if positives.size and not chosen[positives].any():
            chosen[rng.choice(positives)] = True
    remaining = np.flatnonzero(~chosen)
    extra = max(target - int(chosen.sum()), 0)
    chosen[rng.choice(remaining, size=min(extra, remaining.size), replace=False)] = True
    return np.flatnonzero(chosen)


def subsample(labels: np.ndarray, fraction: float, seed: int, task: str) -> np.ndarray:
    """Sorted row indices of a class-stratified `fraction` of a labelled training split.

    'binary' / 'multiclass': round(fraction * n_c) rows of each class c, at least one, so every
    class stays present (the total can exceed fraction * N by up to one row per class).
    'multilabel': round(fraction * N) rows (at least one) that include a positive of every label
    with any positive, when the budget allows (it is exceeded to cover them). fraction=1 keeps
    all rows.
    """
    _check_task(task)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    if task == "multilabel":
        if labels.ndim != 2:
            raise ValueError(f"multilabel labels must be [N, C], got shape {labels.shape}.")
        return _subsample_multilabel(labels.astype(bool), fraction, rng)
    if labels.ndim != 1:
        raise ValueError(f"{task} labels must be [N], got shape {labels.shape}.")
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return np.sort(np.concatenate([_take_per_group(rng, g, fraction) for g in groups]))


def run_probe(
    features: Mapping[str, tuple[np.ndarray, np.ndarray]],
    task: str,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    config: ProbeConfig | None = None,
) -> dict[float, dict[str, Any]]:
    """Train and test one probe per label fraction of the 'train' split ('val', 'test' are full).

    Returns fraction -> test metrics plus 'best_epoch', 'epochs' (run) and 'n_train'.
    """
    config = config or ProbeConfig()
    missing = {"train", "val", "test"} - set(features)
    if missing:
        raise ValueError(f"features needs the splits 'train', 'val', 'test'; missing {missing}.")
    (train_x, train_y), (val_x, val_y) = features["train"], features["val"]
    test_x, test_y = features["test"]
    num_classes = None
    if task == "multiclass":
        num_classes = _num_outputs(task, [np.asarray(y) for y in (train_y, val_y, test_y)])
    results = {}
    for fraction in fractions:
        rows = subsample(train_y, fraction, config.seed, task)
        probe = train_linear_probe(
            np.asarray(train_x)[rows],
            np.asarray(train_y)[rows],
            val_x,
            val_y,
            task,
            config,
            num_classes,
        )
        results[fraction] = {
            **evaluate_linear_probe(probe, test_x, test_y),
            "best_epoch": probe.best_epoch,
            "epochs": len(probe.history),
            "n_train": int(rows.size),
        }
    return results
