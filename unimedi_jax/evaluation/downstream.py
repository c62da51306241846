"""Downstream evaluation of a pre-training checkpoint: the linear probe of the paper's Tables 1-2.

``probe(config, checkpoint)`` loads the encoder (or, for the "Random Init" row, one of the same
architecture with fresh weights), reads the dataset's splits through the pipeline's eval
transforms at the sizes of the checkpoint's own config, extracts frozen final-norm [CLS]
features (``probe_features``, through ``evaluation/predict``) and trains one linear head per label
fraction (``linear_probe.run_probe``). The in-loop ``linear_probe`` evaluator runs the same two.

Fine-tuning (``unimedi_jax/trainers/finetuning.py``) shares the rest: ``open_downstream`` (the eval
config, the checks that the prepared data exists and fits the checkpoint, loading the encoder),
feature extraction and ``eval.json``. Errors a person can act on are ``DownstreamError``, one
paragraph each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from absl import logging

from data_pipelines import builders, eval_split
from data_pipelines.sources import DataConfigError, Source, open_for_model
from unimedi_jax.core.errors import UserError
from unimedi_jax.evaluation import linear_probe, tasks, trained_model
from unimedi_jax.evaluation.predict import Predictor
from unimedi_jax.train.metric_writer import format_duration

_LOG_SECONDS = 30.0


class DownstreamError(UserError, ValueError):
    """A checkpoint, dataset or setting a downstream evaluation cannot use, and what to do."""


class DownstreamSetup(NamedTuple):
    """A downstream run's inputs, checked: the task, its data and the encoder."""

    task: tasks.Downstream
    eval_config: ml_collections.ConfigDict  # the checkpoint's config, reading the dataset
    sources: dict[str, Source]  # by role: train, val, test
    model: trained_model.UniMedIInference


def open_downstream(
    config: ml_collections.ConfigDict,
    checkpoint: str | Path,
    batch_size: int,
    modality: str | None = None,
) -> DownstreamSetup:
    """Checks a probe or fine-tuning config against the checkpoint and the prepared data, then
    loads the encoder (with fresh vision weights for ``config.random_init``).

    The data is checked before the weights load, so a missing dataset is reported at once.
    """
    task = tasks.resolve(config.dataset, modality)
    path = Path(checkpoint)
    if not path.exists():
        raise DownstreamError(
            f"checkpoint {path} does not exist: pass --workdir=a pre-training run's workdir "
            "(its latest checkpoint) or <workdir>/checkpoints/<step>"
        )
    try:
        workdir, _ = trained_model.resolve_run(path)
    except FileNotFoundError as err:
        raise DownstreamError(str(err)) from None
    eval_config = run_eval_config(workdir, config)
    sources = {
        role: open_checked_split(
            task, eval_config, config.splits[role], path, not config.random_init
        )
        for role in tasks.ROLES
    }
    try:
        model = trained_model.load(path, batch_size, config.random_init, config.seed)
    except FileNotFoundError as err:
        raise DownstreamError(f"cannot load checkpoint {path}: {err}") from None
    return DownstreamSetup(task, eval_config, sources, model)


def run_eval_config(
    workdir: str | Path, config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The pre-training run's config with a downstream config's data folder and CT window; an
    empty ``data.hu_window`` (the downstream configs' default) keeps the window the run trained
    with, so a probe reads CTs as the encoder learned them (the demo's is a lung window)."""
    eval_config = ml_collections.ConfigDict(trained_model.load_config(workdir).to_dict())
    eval_config.data.data_dir = config.data.data_dir
    if len(config.data.hu_window):
        eval_config.data.hu_window = tuple(float(v) for v in config.data.hu_window)
    return eval_config


def open_checked_split(
    task: tasks.Downstream,
    config: ml_collections.ConfigDict,
    split: str,
    checkpoint: Path,
    pretrained: bool,
) -> Source:
    """The prepared split, after checking it exists and fits the checkpoint's model (the
    data pipelines' one check, ``sources.open_for_model``).

    ``pretrained`` adds the check that the run saw the modality in pre-training (else its
    tokenizer for it never learned anything).
    """
    _, _, modality = builders.resolve(task.name)
    if pretrained and not config.data[f"sources_{modality}"]:
        raise DownstreamError(
            f"checkpoint {checkpoint} was pre-trained without {modality} data (data.sources_"
            f"{modality} is empty in its config.json), so its {modality} tokenizer is untrained: "
            f"evaluate {task.name} on a checkpoint pre-trained with {modality} data"
        )
    model = config.model
    try:
        return open_for_model(
            task.name,
            config.data.data_dir,
            modality,
            split,
            model.image_size,
            model.volume_size,
            checkpoint=checkpoint,
        )
    except DataConfigError as err:
        raise DownstreamError(str(err)) from None


def extract_features(
    predictor: Predictor,
    params: dict,
    eval_config: ml_collections.ConfigDict,
    task: tasks.Downstream,
    source: Source,
    limit: int = 0,
    with_slices: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Frozen [CLS] features [N, width] of the vision tower in ``params`` and the labels of the
    first ``limit`` records (0: all) of a source, read with ``eval_config``'s eval transforms."""
    total = min(limit, source.size) if limit > 0 else source.size
    k = eval_config.selection.k if with_slices else 0
    features, labels = [], []
    done, start, logged = 0, time.perf_counter(), time.perf_counter()
    batches = eval_split.eval_batches(
        eval_config, task.name, task.modality, source.split, predictor.batch_size
    )
    for batch in batches:
        take = min(total - done, len(batch[task.label_key]))
        arrays = batch["image" if task.modality == "2d" else "volume"][:take]
        features.append(predictor.cls_features(params, arrays, k))
        labels.append(np.asarray(batch[task.label_key])[:take])
        done += take
        now = time.perf_counter()
        if now - logged > _LOG_SECONDS:
            rate = done / (now - start)
            logging.info(
                "features of %s/%s: %d/%d (%.1f/s, ETA %s)",
                task.name,
                source.split,
                done,
                total,
                rate,
                format_duration((total - done) / rate),
            )
            logged = now
        if done >= total:
            break
    return np.concatenate(features), np.concatenate(labels)


def probe_features(
    model: trained_model.UniMedIInference,
    eval_config: ml_collections.ConfigDict,
    task: tasks.Downstream,
    sources: dict[str, Source],
    limits: dict[str, int],
    with_slices: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The linear probe's inputs, for the paper's tables and the in-loop evaluator alike:
    the frozen features and labels of each role's source (train, val, test), up to its limit."""
    features = {}
    for role, source in sources.items():
        started = time.perf_counter()
        features[role] = extract_features(
            model.predictor, model.params, eval_config, task, source, limits[role], with_slices
        )
        logging.info(
            "features of %s/%s: %s in %s",
            task.name,
            source.split,
            features[role][0].shape,
            format_duration(time.perf_counter() - started),
        )
    return features


def _encoder_name(random_init: bool) -> str:
    return "random_init" if random_init else "pretrained"


def probe(config: ml_collections.ConfigDict, checkpoint: str | Path) -> dict[str, Any]:
    """Linear probe of a checkpoint on ``config.dataset`` at ``config.fractions``.

    Returns {'kind': 'probe', 'dataset', 'task', 'modality', 'classes', 'metric' (the figure
    the paper reports), 'encoder' ('pretrained' | 'random_init'), 'checkpoint', 'step', 'splits'
    (records used per split), 'probe' (its settings), 'with_slices', 'seed', 'fractions':
    {'0.01': {'auroc', 'loss', ['accuracy'], 'n_train', 'best_epoch', 'epochs'}, ...}}.
    """
    with_slices = bool(config.features.with_slices)
    if with_slices and tasks.resolve(config.dataset).modality != "3d":
        raise DownstreamError(
            f"features.with_slices=True adds selected CT slices, but {config.dataset} is 2D: "
            "leave it False"
        )
    task, eval_config, sources, model = open_downstream(
        config, checkpoint, config.features.batch_size
    )
    logging.info("%s encoder", _encoder_name(config.random_init))
    features = probe_features(model, eval_config, task, sources, config.limit, with_slices)
    probe_config = linear_probe.ProbeConfig(**config.probe.to_dict(), seed=config.seed)
    results = linear_probe.run_probe(features, task.task, tuple(config.fractions), probe_config)
    return {
        **describe(task, config.random_init, checkpoint, model.step),
        "kind": "probe",
        "splits": {role: len(features[role][1]) for role in tasks.ROLES},
        "probe": config.probe.to_dict(),
        "with_slices": with_slices,
        "seed": config.seed,
        "fractions": {str(float(f)): metrics for f, metrics in results.items()},
    }


def describe(
    task: tasks.Downstream, random_init: bool, checkpoint: str | Path, step: int | None
) -> dict[str, Any]:
    """What an eval.json says about the dataset and the encoder it measured."""
    workdir, _ = trained_model.resolve_run(checkpoint)
    return {
        "dataset": task.name,
        "task": task.task,
        "modality": task.modality,
        "classes": list(task.classes),
        "metric": task.metric,
        "encoder": _encoder_name(random_init),
        "checkpoint": str(Path(workdir).resolve()),
        "step": step,
    }


def default_out_dir(config: ml_collections.ConfigDict, checkpoint: str | Path) -> Path:
    """<run workdir>/probe/<dataset>-<fractions>[-random_init]."""
    workdir, _ = trained_model.resolve_run(checkpoint)
    name = (
        config.dataset.replace("/", "_") + "-" + "_".join(str(float(f)) for f in config.fractions)
    )
    return workdir / "probe" / (name + ("-random_init" if config.random_init else ""))


def write_eval_json(directory: str | Path, results: dict[str, Any]) -> Path:
    """Writes ``directory/eval.json`` (creating the directory) and returns its path."""
    path = Path(directory) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path
