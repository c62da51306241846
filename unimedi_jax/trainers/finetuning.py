"""The fine-tuning trainer (``kind: finetune``): full fine-tuning of the vision encoder for 3D
classification (paper Table 3).

The checkpoint's vision tower (its ``vision_weights``, as the probe uses) and a zero-initialised
linear head on its final-norm [CLS] feature train together: AdamW with a linear warm-up and cosine
decay (``train/state.py``), random flips of the training volumes on the host
(``finetune_epochs.labelled_epoch``), data parallel over the local devices. After each epoch the
validation split is scored and the parameters of the epoch with the lowest validation loss are
kept on the host; those are tested. The head has the linear probe's layout, so validation and
test reuse its metrics (``linear_probe.evaluate_linear_probe``): AUROC, plus accuracy for
multiclass.

``finetune`` reads top to bottom (set up, state, the step loop with validation after each epoch,
test) on the loop parts pre-training uses too (``train/loop.py``): progress and ETA every
``log_every_steps``, a NaN/Inf loss or gradient stops the run naming the epoch and step, and
SIGTERM/SIGINT stops it after the current step with a message.

Writes ``workdir/config.json`` (the fine-tuning config, ``kind: finetune``), ``workdir/eval.json``
(test metrics, the per-epoch history) and ``workdir/metrics.jsonl`` (one line per epoch, also to
TensorBoard). One process; no resume (a run is minutes to hours; a stopped run is started again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from data_pipelines import finetune_epochs
from unimedi_jax.core import sharding
from unimedi_jax.core.run_folders import FINETUNE, check_new_run
from unimedi_jax.evaluation import downstream, linear_probe
from unimedi_jax.evaluation.predict import Predictor
from unimedi_jax.models.vit import VisionTransformer
from unimedi_jax.train.loop import NonFiniteWatch, Progress, is_due
from unimedi_jax.train.metric_writer import MetricWriter
from unimedi_jax.train.preemption import Preempted, StopRequest
from unimedi_jax.train.state import learning_rate_schedule, make_optimizer

NONFINITE_REMEDY = (
    "Fine-tuning keeps no checkpoint; lower train.learning_rate (or train.grad_clip_norm) and "
    "run it again."
)


def _logits(vision: VisionTransformer, params: dict, volumes: jax.Array) -> jax.Array:
    features = vision.apply({"params": params["vision"]}, volumes).tokens[:, 0]
    return features.astype(jnp.float32) @ params["head"]["kernel"] + params["head"]["bias"]


def _loss(logits: jax.Array, labels: jax.Array, task: str) -> jax.Array:
    """Softmax cross-entropy (multiclass) or mean sigmoid BCE over the label columns."""
    if task == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = labels.astype(jnp.float32).reshape(logits.shape)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def make_finetune_step(
    vision: VisionTransformer,
    tx: optax.GradientTransformation,
    task: str,
    mesh: jax.sharding.Mesh,
) -> Callable:
    """(params, opt_state, volumes, labels) -> (params, opt_state, {loss, grad_norm}), jitted
    over ``mesh``: state replicated and donated, the batch split over its devices."""

    def step(params, opt_state, volumes, labels):
        loss, grads = jax.value_and_grad(
            lambda p: _loss(_logits(vision, p, volumes), labels, task)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, split, split),
        out_shardings=replicated,
        donate_argnums=(0, 1),
    )


def _score(run: _Run, params: dict, role: str) -> dict[str, float]:
    """Loss and metrics of encoder + head on a split: the probe's feature extraction (on the
    fine-tuning mesh) and its head metrics."""
    setup = run.setup
    predictor = Predictor(setup.model.model, run.mesh, run.config.train.eval_batch_size)
    features, labels = downstream.extract_features(
        predictor, {"vision": params["vision"]}, setup.eval_config, setup.task, setup.sources[role]
    )
    head = jax.device_get(params["head"])
    return linear_probe.evaluate_head(head, features, labels, setup.task.task)


@dataclasses.dataclass
class _Run:
    """A fine-tuning run set up: encoder and data (checked), optimiser, steps."""

    config: ml_collections.ConfigDict
    setup: downstream.DownstreamSetup
    mesh: jax.sharding.Mesh
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.config.train.epochs * self.steps_per_epoch


def _setup(config: ml_collections.ConfigDict, checkpoint: str | Path) -> _Run:
    """Checks the data, loads the encoder, checks the batch size, builds the optimiser."""
    if jax.process_count() > 1:
        raise downstream.DownstreamError("fine-tuning runs in one process (all its devices)")
    train_cfg = config.train
    setup = downstream.open_downstream(config, checkpoint, train_cfg.eval_batch_size, "3d")
    mesh = sharding.make_mesh(-1, 1, 1, jax.local_devices())
    batch_size, shards = int(train_cfg.batch_size), mesh.shape["data"]
    train = setup.sources["train"]
    if batch_size % shards or train.size < batch_size:
        raise downstream.DownstreamError(
            f"train.batch_size={batch_size} must be a multiple of the {shards} devices and at "
            f"most the {train.size} records of {train.name} ({train.split})"
        )
    steps_per_epoch = train.size // batch_size
    schedule = learning_rate_schedule(
        train_cfg.learning_rate,
        train_cfg.init_learning_rate,
        train_cfg.end_learning_rate,
        train_cfg.warmup_epochs * steps_per_epoch,
        train_cfg.epochs * steps_per_epoch,
    )
    tx = make_optimizer(train_cfg, schedule)
    return _Run(config, setup, mesh, schedule, tx, steps_per_epoch)


def _initial_state(run: _Run) -> tuple[dict, optax.OptState]:
    """The checkpoint's vision tower and a zero head, with their optimizer state, replicated."""
    task, model = run.setup.task, run.setup.model
    outputs = 1 if task.task == "binary" else len(task.classes)
    width = model.config.model.width
    head = {"kernel": jnp.zeros((width, outputs)), "bias": jnp.zeros((outputs,))}
    params = jax.device_put(
        {"vision": model.params["vision"], "head": head}, sharding.replicated(run.mesh)
    )
    opt_state = jax.jit(run.tx.init, out_shardings=sharding.replicated(run.mesh))(params)
    return params, opt_state


def _describe(metrics: Mapping[str, float]) -> str:
    return f"loss {metrics['loss']:.4f}  lr {metrics['learning_rate']:.2e}"


@dataclasses.dataclass
class _Training:
    """What the step loop carries from epoch to epoch: the state, the compiled step, the step
    count, the progress line and the non-finite watch."""

    params: dict
    opt_state: optax.OptState
    step_fn: Callable
    progress: Progress
    nonfinite: NonFiniteWatch
    step: int = 0


def finetune(
    config: ml_collections.ConfigDict, checkpoint: str | Path, workdir: str | Path
) -> dict[str, Any]:
    """Fine-tunes the checkpoint's encoder on ``config.dataset``; writes and returns eval.json's
    content: {'kind': 'finetune', dataset/encoder fields as a probe's, 'test': {metrics},
    'best_epoch', 'epochs', 'splits', 'train' (the settings), 'history': [per epoch]}.

    ``workdir`` may be new or an earlier fine-tuning run's (which this one replaces), never a
    folder holding another kind of run: that is refused before anything is read or written.
    Raises ``Preempted`` after a SIGTERM/SIGINT, ``NonFiniteLossError`` at a NaN/Inf."""
    workdir = Path(workdir)
    check_new_run(workdir, FINETUNE)  # the folder first, then the data and the encoder
    run = _setup(config, checkpoint)
    _start_folder(run, workdir)
    history, best = _train(run, workdir)
    return _test_best_epoch(run, checkpoint, workdir, history, best)


def _start_folder(run: _Run, workdir: Path) -> None:
    """Logs what will run and writes the run's config.json."""
    config = run.config
    logging.info(
        "fine-tuning %s: %d epochs x %d steps of %d volumes on %d devices",
        run.setup.task.name,
        config.train.epochs,
        run.steps_per_epoch,
        config.train.batch_size,
        run.mesh.size,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def _train(run: _Run, workdir: Path) -> tuple[list[dict], tuple[float, int, dict]]:
    """Every epoch's steps, then its validation split; returns the history and the best epoch
    (lowest validation loss) as (val loss, epoch, host params)."""
    params, opt_state = _initial_state(run)
    training = _Training(
        params,
        opt_state,
        make_finetune_step(run.setup.model.model.vision, run.tx, run.setup.task.task, run.mesh),
        Progress(run.total_steps, run.config.train.batch_size, _describe, unit="volumes"),
        NonFiniteWatch(True, NONFINITE_REMEDY),
    )
    writer = MetricWriter(workdir)
    best, history = (np.inf, -1, {}), []
    with StopRequest() as stop:
        try:
            for epoch in range(run.config.train.epochs):
                losses = _train_epoch(run, training, epoch, stop, workdir)
                record = _validate(run, training.params, epoch, losses)
                history.append(record)
                writer.write(epoch + 1, {k: v for k, v in record.items() if k != "epoch"})
                if record["val_loss"] < best[0]:
                    best = (record["val_loss"], epoch, jax.device_get(training.params))
                _log_epoch(run, record, best[1], training.progress.eta(training.step))
        finally:
            writer.close()
    return history, best


def _train_epoch(
    run: _Run, training: _Training, epoch: int, stop: StopRequest, workdir: Path
) -> list[jax.Array]:
    """One epoch of steps on the training split; returns the steps' losses (on device)."""
    config, task = run.config, run.setup.task
    at, losses = f"{epoch + 1}/{config.train.epochs}", []
    for batch in finetune_epochs.labelled_epoch(
        run.setup.sources["train"],
        task.label_key,
        config.train.batch_size,
        config.seed,
        epoch,
        window=tuple(run.setup.eval_config.data.hu_window),
        flip_axes=tuple(config.train.flip_axes),
        threads=config.data.read_threads,
    ):
        batch = sharding.global_batch(batch, run.mesh)
        training.params, training.opt_state, metrics = training.step_fn(
            training.params, training.opt_state, batch["volume"], batch[task.label_key]
        )
        training.step += 1
        step = training.step
        training.nonfinite.dispatched(step, metrics, at)
        losses.append(metrics["loss"])
        training.progress.tick()
        if is_due(step, config.log_every_steps, run.total_steps):
            training.nonfinite.check(step, metrics, at)
            lr = run.schedule(step - 1)  # the rate this step applied
            training.progress.report(step, {**metrics, "learning_rate": lr}, f"epoch {at}  ")
        if stop.agreed():
            raise Preempted(
                f"fine-tuning stopped by {stop.requested} at epoch {at}, step {step}; it does "
                f"not resume: {workdir} holds only metrics.jsonl of the finished epochs. Run the "
                "same command to start it again."
            )
    training.nonfinite.check(training.step, metrics, at)
    return losses


def _validate(run: _Run, params: dict, epoch: int, losses: list[jax.Array]) -> dict[str, Any]:
    """The epoch's history record: mean training loss, validation loss and metric."""
    metric = run.setup.task.metric
    val = _score(run, params, "val")
    return {
        "epoch": epoch,
        "train_loss": float(np.mean(jax.device_get(losses))),
        "val_loss": val["loss"],
        f"val_{metric}": val[metric],
    }


def _log_epoch(run: _Run, record: dict[str, Any], best_epoch: int, eta: str) -> None:
    metric = run.setup.task.metric
    logging.info(
        "epoch %d/%d train loss %.4f val loss %.4f val %s %.4f (best epoch %d) ETA %s",
        record["epoch"] + 1,
        run.config.train.epochs,
        record["train_loss"],
        record["val_loss"],
        metric,
        record[f"val_{metric}"],
        best_epoch + 1,
        eta,
    )


def _test_best_epoch(
    run: _Run,
    checkpoint: str | Path,
    workdir: Path,
    history: list[dict],
    best: tuple[float, int, dict],
) -> dict[str, Any]:
    """Tests the epoch with the lowest validation loss; writes and returns eval.json's content."""
    config, (task, _, sources, model) = run.config, run.setup
    _, best_epoch, best_params = best
    test = _score(run, best_params, "test")
    results = {
        **downstream.describe(task, config.random_init, checkpoint, model.step),
        "kind": "finetune",
        "test": test,
        "best_epoch": best_epoch,
        "epochs": len(history),
        "splits": {role: source.size for role, source in sources.items()},
        "train": config.train.to_dict(),
        "seed": config.seed,
        "history": history,
    }
    written = downstream.write_eval_json(workdir, results)
    metric = task.metric
    logging.info("test %s %.4f (epoch %d); wrote %s", metric, test[metric], best_epoch + 1, written)
    return results
