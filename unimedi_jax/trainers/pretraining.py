"""The pre-training trainer (``kind: pretrain``): data -> compiled step -> metrics,
checkpoints, in-loop evaluation, resume. ``train`` reads top to bottom: set up the run folder,
data and text tower; build the sharded state (or restore it); the step loop on the shared parts
of ``train/loop.py``; finish.

Runs the same on one CPU and on a multi-host mesh: every process builds the same mesh, reads its
slice of each global batch and takes part in the compiled step and in checkpoint writes; only
process 0 writes metrics and TensorBoard events.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from data_pipelines.prepare import check_prepared, ensure_prepared
from data_pipelines.train_stream import TrainStream
from unimedi_jax.config.checks import check_batch_for_mesh, check_config
from unimedi_jax.config.preprocessing import record_preprocessing
from unimedi_jax.core import sharding
from unimedi_jax.core.errors import ConfigError
from unimedi_jax.core.precision import compute_dtype
from unimedi_jax.core.run_folders import PRETRAIN, check_new_run
from unimedi_jax.evaluation.evaluators import Evaluator, run_evaluators
from unimedi_jax.evaluation.evaluators import from_config as evaluators_from_config
from unimedi_jax.evaluation.trained_model import UniMedIInference
from unimedi_jax.models.unimedi import UniMedI, build_unimedi
from unimedi_jax.text_tower.run_setup import TextTower, prepare_text_tower
from unimedi_jax.train.checkpoint import Checkpointer, abstract_like
from unimedi_jax.train.loop import NonFiniteWatch, Progress, is_due, phase_starts
from unimedi_jax.train.metric_writer import MetricWriter, format_duration
from unimedi_jax.train.preemption import Preempted, StopRequest
from unimedi_jax.train.state import (
    TrainState,
    learning_rate_schedule,
    make_optimizer,
    state_initializer,
)
from unimedi_jax.train.step import StepSchedules, make_schedules, make_train_step
from unimedi_jax.train.workdir import check_workdir, record_config

NONFINITE_REMEDY = (
    "lower train.learning_rate or set precision.compute_dtype=float32 and resume, or set "
    "train.on_nonfinite=skip to skip such updates."
)


def schedule_lengths(config, steps_per_epoch: int) -> tuple[int, int]:
    """(total_steps, warmup_steps): explicit step counts win, else epochs x steps_per_epoch."""
    total = config.total_steps
    if total < 0:
        total = config.train.epochs * steps_per_epoch
    warmup = config.train.warmup_steps
    if warmup < 0:
        warmup = config.train.warmup_epochs * steps_per_epoch
    return total, min(warmup, total)


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class Trainer(NamedTuple):
    model: UniMedI
    state: TrainState  # created already sharded over the mesh
    step: Callable  # the jitted step: (state, global batch) -> (state, metrics); donates state
    schedules: StepSchedules


def build_trainer(
    config, text: TextTower, mesh: jax.sharding.Mesh, total_steps: int, warmup_steps: int
) -> Trainer:
    """Model, optimizer, sharded initial state and the compiled step for one mesh."""
    model = build_unimedi(config, text.config, compute_dtype(config.precision.compute_dtype))
    lr = learning_rate_schedule(
        config.train.learning_rate,
        config.train.init_learning_rate,
        config.train.end_learning_rate,
        warmup_steps,
        total_steps,
    )
    tx = make_optimizer(config.train, lr)
    state, shardings = sharding.create_sharded(
        state_initializer(model, tx, config),
        jax.random.key(config.seed),
        mesh=mesh,
        rules=sharding.logical_axis_rules(),
    )
    if text.params is not None:
        pretrained = jax.device_put(text.params, shardings.params["text"])
        state = state.replace(params={**state.params, "text": pretrained})
    schedules = make_schedules(config, lr, total_steps, warmup_steps)
    step_fn = make_train_step(model, tx, schedules, config)
    compiled = jax.jit(
        step_fn,
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return Trainer(model, state, compiled, schedules)


def demo_data_dir(config, root: Path) -> Path:
    """Where the phantoms of ``config`` are built under ``root``: ``data`` for the demo's
    lobar lesions, ``data_<setting>_lesions`` for another setting, so that runs of both
    settings can share a root (an ablation's --out)."""
    lesions = config.data.phantom_lesions
    return root / ("data" if lesions == "lobar" else f"data_{lesions}_lesions")


def prepare_demo_data(config, workdir: Path) -> None:
    """The demo's data: with ``data.data_dir`` empty, phantoms are built into
    ``demo_data_dir(config, workdir)``.

    Process 0 builds; the others wait at a barrier, so no two processes write the same files.
    """
    uses_phantoms = "phantoms" in f"{config.data.sources_2d},{config.data.sources_3d}"
    if not uses_phantoms:
        return
    if config.data.data_dir:  # the user's own build: it must hold the lesions asked for
        check_prepared("phantoms", config.data.data_dir, lesions=config.data.phantom_lesions)
        return
    config.data.data_dir = str(demo_data_dir(config, workdir))
    if jax.process_index() == 0:
        for summary in ensure_prepared(
            "phantoms",
            config.data.data_dir,
            image_size=config.model.image_size[0],
            volume_shape=tuple(config.model.volume_size),
            lesions=config.data.phantom_lesions,
        ):
            logging.info("%s", summary.format())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("demo data prepared")


def train(config, workdir: str | Path) -> dict:
    """Trains (or resumes) UniMedI in ``workdir``; returns the last logged metrics."""
    workdir = Path(workdir)
    is_chief = jax.process_index() == 0
    check_config(config, workdir)
    check_new_run(workdir, PRETRAIN)
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
    prepare_demo_data(config, workdir)
    record_preprocessing(config)  # config.json says how files become this run's inputs
    check_workdir(config, workdir)  # may refuse the run: nothing of it is written before
    text = prepare_text_tower(config, workdir)
    data = TrainStream(config, text.tokenizer, jax.process_index(), jax.process_count())
    total_steps, warmup_steps = schedule_lengths(config, data.steps_per_epoch)

    # State: sharded over the mesh, restored from the newest readable checkpoint if any.
    mesh = sharding.mesh_from_config(config.mesh)
    check_batch_for_mesh(config, mesh.shape["data"] * mesh.shape["fsdp"])
    trainer = build_trainer(config, text, mesh, total_steps, warmup_steps)
    state = trainer.state
    evaluators = evaluators_from_config(config)  # unknown names fail before the first step

    checkpointer, start, state = restore_newest(config, workdir, state, data, text)
    record_config(config, workdir)  # the checkpoint read (or there was none)

    # The step loop on the shared parts (train/loop.py), with in-loop evaluation.
    log_run_layout(state.params, mesh)
    writer = MetricWriter(workdir, enabled=is_chief, resume_step=start)
    progress = Progress(total_steps, config.batch.size_2d + config.batch.size_3d, describe_losses)
    # 'skip' lives in the compiled step; 'stop' is checked here.
    nonfinite = NonFiniteWatch(config.train.on_nonfinite == "stop", NONFINITE_REMEDY, checkpointer)
    phases = phase_starts(trainer.schedules.masking, total_steps, warmup_steps)
    entered: dict[str, float] = {}  # phases started since the last logged line
    with StopRequest() as stop:
        try:
            for step in range(start + 1, total_steps + 1):
                for key, line in phases.get(step, ()):
                    logging.info("%s", line)
                    entered[key] = float(step)
                batch = sharding.global_batch(next(data), mesh)
                state, metrics = trainer.step(state, batch)
                nonfinite.dispatched(step, metrics)
                progress.tick()
                stopping = stop.agreed()
                is_log_step = is_due(step, config.log_every_steps, total_steps)
                is_ckpt_step = is_due(step, config.checkpoint_every_steps, total_steps) or stopping
                if is_log_step or is_ckpt_step:
                    nonfinite.check(step, metrics)
                if is_log_step:
                    logged = {**jax.device_get(metrics), **data.skip_metrics()}
                    writer.write(step, {**progress.report(step, logged), **entered})
                    entered = {}
                if is_ckpt_step:
                    checkpointer.save(step, state, data.get_state())
                due = [e for e in evaluators if e.due(step, total_steps)]
                if due:
                    writer.write(step, evaluate_state(config, due, trainer, state, text, mesh))
                if stopping:
                    raise Preempted(
                        f"stopped by {stop.requested or 'another process'} at step {step}; "
                        f"checkpoint saved in {checkpointer.directory}. Run the same command "
                        "to resume."
                    )
        finally:
            writer.close()
            data.close()
            checkpointer.close()  # last: it raises if the final save failed
    log_finished(total_steps - start, total_steps, progress)
    return progress.last


def restore_newest(
    config, workdir: Path, state: TrainState, data: TrainStream, text: TextTower
) -> tuple[Checkpointer, int, TrainState]:
    """The run's checkpointer and where training starts: the newest readable checkpoint's step
    and state, with ``data`` moved to its position; else step 0 and ``state``. A run whose
    pretrained text tower is no longer readable needs a checkpoint to take it from."""
    checkpointer = Checkpointer(
        workdir / "checkpoints",
        keep=config.keep_checkpoints,
        keep_every=config.keep_checkpoint_every_steps,
        clean_up=True,
    )
    restored = checkpointer.restore_newest(abstract_like(state))  # skips damaged ones
    if restored is not None:
        start, state, data_state = restored
        data.set_state(data_state)
        logging.info("Resumed from %s at step %d", checkpointer.directory, start)
        return checkpointer, start, state
    if text.params is None and config.text.path:
        checkpointer.close()
        raise ConfigError(
            f"text.path={config.text.path!r} is not readable and {checkpointer.directory} holds "
            "no readable checkpoint to take the text tower's weights from: point "
            "--config.text.path at the pretrained BERT to start this run afresh."
        )
    return checkpointer, 0, state


def log_finished(done: int, total_steps: int, progress: Progress) -> None:
    """The last line of a run: the steps this process trained (a resumed run started later)."""
    logging.info(
        "Finished %d step%s in %s; the run is at step %d",
        done,
        "" if done == 1 else "s",
        format_duration(progress.elapsed()),
        total_steps,
    )


def evaluate_state(
    config,
    evaluators: Sequence[Evaluator],
    trainer: Trainer,
    state: TrainState,
    text: TextTower,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """In-loop evaluation of the current weights by ``evaluators``, on the state as it is
    sharded over ``mesh``: no parameter is gathered. Every process takes part (the predict
    functions are collective) and computes the same figures; process 0's are written."""
    started = time.perf_counter()
    runner = UniMedIInference(
        config, trainer.model, state.params, state.teacher, text.tokenizer, mesh=mesh
    )
    results = run_evaluators(runner, config, evaluators)
    logging.info(
        "eval at step %d (%.0fs; all %d figures in metrics.jsonl):\n%s",
        int(state.step),
        time.perf_counter() - started,
        len(results),
        "\n".join(headline_figures(results)),
    )
    return results


# The figures an in-training evaluation shows in the log, one line per evaluator.
HEADLINES = (
    r"zero_shot_\w+/mean_auroc",
    r"cross_modal/\w+_mAP",
    r"slice_selection/(random_)?hit_rate",
    r"retrieval_\w+/image_to_text/R@10",
    r"linear_probe_\w+/\w+@1",
)


def headline_figures(results: dict[str, float]) -> list[str]:
    """The ``HEADLINES`` of ``results``, one indented line per evaluator."""
    lines: dict[str, list[str]] = {}
    for name, value in sorted(results.items()):
        if any(re.fullmatch(pattern, name) for pattern in HEADLINES):
            group, _, figure = name.partition("/")
            lines.setdefault(group, []).append(f"{figure} {value:.3f}")
    return [f"  {group}: {', '.join(figures)}" for group, figures in lines.items()]


def log_run_layout(params: dict, mesh: jax.sharding.Mesh) -> None:
    """Parameter count per tower, mesh and devices: the first thing to check in a run's log."""
    vision, text = count_params(params["vision"]), count_params(params["text"])
    heads = count_params(params) - vision - text
    logging.info(
        "Parameters: vision %s, text %s, heads %s | mesh %s | %d devices (%s), %d processes",
        f"{vision:,}",
        f"{text:,}",
        f"{heads:,}",
        dict(mesh.shape),
        jax.device_count(),
        jax.devices()[0].device_kind,
        jax.process_count(),
    )


def describe_losses(metrics: dict[str, float]) -> str:
    """The loss terms and learning rate of a pre-training console line."""
    icl, pcl = metrics.get("loss_icl", 0.0), metrics.get("loss_pcl", 0.0)
    return (
        f"loss {metrics['loss']:.4f} (vl {metrics['loss_vl']:.4f} icl {icl:.4f} pcl {pcl:.4f})"
        f"  lr {metrics['learning_rate']:.2e}"
    )
