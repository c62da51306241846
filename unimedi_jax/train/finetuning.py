"""Full fine-tuning of the vision encoder for 3D classification (paper Table 3).

The checkpoint's vision tower (teacher weights, as the probe uses) and a zero-initialised linear
head on its final-norm [CLS] feature train together: AdamW with a linear warm-up and cosine
decay (``train/state.py``), random flips of the training volumes inside the jitted step, data
parallel over the local devices. After each epoch the validation split is scored and the
parameters of the epoch with the lowest validation loss are kept on the host; those are tested.
The head has the linear probe's layout, so validation and test reuse its metrics
(``linear_probe.evaluate_linear_probe``): AUROC, plus accuracy for multiclass.

Writes ``workdir/config.json`` (the fine-tuning config, ``kind: finetune``), ``workdir/eval.json``
(test metrics, the per-epoch history) and ``workdir/metrics.jsonl`` (one line per epoch, also to
TensorBoard). One process; no resume (a run is minutes to hours).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from data_pipelines import imaging
from unimedi_jax.core import sharding
from unimedi_jax.core.run_folders import FINETUNE, check_new_run
from unimedi_jax.evaluation import downstream, linear_probe
from unimedi_jax.inference import UniMedIInference
from unimedi_jax.models.vit import VisionTransformer
from unimedi_jax.train.metric_writer import MetricWriter, format_duration
from unimedi_jax.train.state import learning_rate_schedule, make_optimizer


def _logits(vision: VisionTransformer, params: dict, volumes: jax.Array) -> jax.Array:
    features = vision.apply({"params": params["vision"]}, volumes).tokens[:, 0]
    return features.astype(jnp.float32) @ params["head"]["kernel"] + params["head"]["bias"]


def _loss(logits: jax.Array, labels: jax.Array, task: str) -> jax.Array:
    """Softmax cross-entropy (multiclass) or mean sigmoid BCE over the label columns."""
    if task == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = labels.astype(jnp.float32).reshape(logits.shape)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def random_flips(rng: jax.Array, volumes: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Flips each volume [B, D, H, W] along each of ``axes`` (0 = D) with probability 1/2."""
    for axis, key in zip(axes, jax.random.split(rng, len(axes)), strict=True):
        flip = jax.random.bernoulli(key, 0.5, (volumes.shape[0], 1, 1, 1))
        volumes = jnp.where(flip, jnp.flip(volumes, axis=axis + 1), volumes)
    return volumes


def make_train_step(
    vision: VisionTransformer,
    tx: optax.GradientTransformation,
    task: str,
    flip_axes: tuple[int, ...],
    mesh: jax.sharding.Mesh,
) -> Callable:
    """(params, opt_state, volumes, labels, rng) -> (params, opt_state, loss), jitted over
    ``mesh``: state replicated and donated, the batch split over its devices."""

    def step(params, opt_state, volumes, labels, rng):
        volumes = random_flips(rng, volumes, flip_axes)
        loss, grads = jax.value_and_grad(
            lambda p: _loss(_logits(vision, p, volumes), labels, task)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, split, split, replicated),
        out_shardings=replicated,
        donate_argnums=(0, 1),
    )


@dataclasses.dataclass(frozen=True)
class _Windowed:
    """A training record -> (volume in [0, 1], label), in grain's reader threads."""

    window: tuple[float, float]
    label_key: str

    def __call__(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        volume = imaging.transform_3d(record["volume"], window=self.window)
        return volume, np.asarray(record[self.label_key])


def _epoch_batches(
    reader, transform: _Windowed, batch_size: int, seed: int, epoch: int, threads: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of full batches in a fresh seeded order, read ahead by ``threads`` threads."""
    order_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    ds = grain.MapDataset.source(reader).shuffle(seed=order_seed).map(transform)
    ds = ds.batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads)))


def _score(
    setup: downstream.DownstreamSetup, params: dict, role: str, best_epoch: int
) -> dict[str, float]:
    """Loss and metrics of encoder + head on a split, through the linear probe's evaluation."""
    model, task = setup.model, setup.task
    vision = {"vision": params["vision"]}
    runner = UniMedIInference(model.config, model.model, vision, {}, None, model.batch_size)
    features, labels = downstream.extract_features(
        runner, setup.eval_config, task, setup.sources[role]
    )
    width = features.shape[1]
    result = linear_probe.ProbeResult(
        jax.device_get(params["head"]),
        np.zeros(width, np.float32),
        np.ones(width, np.float32),
        task.task,
        best_epoch,
    )
    return linear_probe.evaluate_linear_probe(result, features, labels)


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


def _fit(run: _Run, writer: MetricWriter) -> tuple[list[dict[str, float]], int, dict]:
    """Trains for the configured epochs, scoring the validation split after each; returns the
    history, the best epoch (lowest validation loss) and its parameters on the host."""
    config, (task, eval_config, sources, model) = run.config, run.setup
    epochs, batch_size = config.train.epochs, config.train.batch_size
    outputs = 1 if task.task == "binary" else len(task.classes)
    width = model.config.model.width
    head = {"kernel": jnp.zeros((width, outputs)), "bias": jnp.zeros((outputs,))}
    params = jax.device_put(
        {"vision": model.teacher["vision"], "head": head}, sharding.replicated(run.mesh)
    )
    opt_state = jax.jit(run.tx.init, out_shardings=sharding.replicated(run.mesh))(params)
    vision = model.model.vision
    step_fn = make_train_step(vision, run.tx, task.task, tuple(config.train.flip_axes), run.mesh)
    reader = sources["train"].open()
    transform = _Windowed(tuple(eval_config.data.hu_window), task.label_key)
    base_key = jax.random.key(config.seed)
    best = (np.inf, -1, {})  # (val loss, epoch, host params)
    history, epoch_seconds = [], []
    step, timed_from = 0, 0.0
    for epoch in range(epochs):
        epoch_start, losses = time.perf_counter(), []
        threads = config.data.read_threads
        for volumes, labels in _epoch_batches(
            reader, transform, batch_size, config.seed, epoch, threads
        ):
            batch = sharding.global_batch({"volume": volumes, "label": labels}, run.mesh)
            rng = jax.random.fold_in(base_key, step)
            params, opt_state, loss = step_fn(
                params, opt_state, batch["volume"], batch["label"], rng
            )
            losses.append(loss)
            step += 1
            if step == 1:  # time the steps after the compiling one
                jax.block_until_ready(loss)
                timed_from = time.perf_counter()
            elif step % config.log_every_steps == 0:
                per_step = (time.perf_counter() - timed_from) / (step - 1)
                logging.info(
                    "epoch %d/%d step %d/%d loss %.4f lr %.2e %.1f volumes/s ETA %s",
                    epoch + 1,
                    epochs,
                    step,
                    run.total_steps,
                    float(loss),
                    float(run.schedule(step)),
                    batch_size / per_step,
                    format_duration((run.total_steps - step) * per_step),
                )
        val = _score(run.setup, params, "val", epoch)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(jax.device_get(losses))),
            "val_loss": val["loss"],
            f"val_{task.metric}": val[task.metric],
        }
        history.append(record)
        writer.write(epoch + 1, {k: v for k, v in record.items() if k != "epoch"})
        if val["loss"] < best[0]:
            best = (val["loss"], epoch, jax.device_get(params))
        epoch_seconds.append(time.perf_counter() - epoch_start)
        per_epoch = np.mean(epoch_seconds[1:] or epoch_seconds)  # the first one compiles
        logging.info(
            "epoch %d/%d train loss %.4f val loss %.4f val %s %.4f (best epoch %d) ETA %s",
            epoch + 1,
            epochs,
            record["train_loss"],
            val["loss"],
            task.metric,
            val[task.metric],
            best[1] + 1,
            format_duration(per_epoch * (epochs - epoch - 1)),
        )
    return history, best[1], best[2]


def finetune(
    config: ml_collections.ConfigDict, checkpoint: str | Path, workdir: str | Path
) -> dict[str, Any]:
    """Fine-tunes the checkpoint's encoder on ``config.dataset``; writes and returns eval.json's
    content: {'kind': 'finetune', dataset/encoder fields as a probe's, 'test': {metrics},
    'best_epoch', 'epochs', 'splits', 'train' (the settings), 'history': [per epoch]}.

    ``workdir`` may be new or an earlier fine-tuning run's (which this one replaces), never a
    folder holding another kind of run: that is refused before anything is read or written."""
    workdir = Path(workdir)
    check_new_run(workdir, FINETUNE)
    run = _setup(config, checkpoint)
    task, _, sources, model = run.setup
    logging.info(
        "fine-tuning %s: %d epochs x %d steps of %d volumes on %d devices",
        task.name,
        config.train.epochs,
        run.steps_per_epoch,
        config.train.batch_size,
        run.mesh.size,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    writer = MetricWriter(workdir)
    try:
        history, best_epoch, best_params = _fit(run, writer)
    finally:
        writer.close()
    test = _score(run.setup, best_params, "test", best_epoch)
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
