"""Evaluators on held-out data: retrieval, zero-shot, cross-modal mAP, slice hit rate and
choice, probe.

Named units configured from the config (as big_vision's ``evaluators/common.py``): ``evals``
names the ones to run (``EVALUATORS`` maps names to them) and each reads its own schedule (every
N steps), split and record limit from ``eval_settings.<name>``, where -1 / '' take the run-wide
``eval_every_steps`` / ``eval_split`` / ``eval_limit``. The in-loop evaluation
(``trainers/pretraining.evaluate_state``, on the sharded train state through ``predict``)
and ``python -m unimedi_jax.evaluate`` (on a loaded checkpoint) run the same evaluators.

Each evaluator reads embeddings from an ``EvalSet`` (computed once per split and limit of an
evaluation) and returns a flat dict of named figures, so results go straight to metrics.jsonl,
TensorBoard and eval.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import builders
from data_pipelines.eval_split import eval_batches
from data_pipelines.sources import open_source, parse_sources
from unimedi_jax.core.errors import ConfigError
from unimedi_jax.evaluation import (
    downstream,
    metrics,
    tasks,
    trained_model,
    zero_shot_metrics,
    zero_shot_prompts,
)
from unimedi_jax.evaluation.linear_probe import run_probe
from unimedi_jax.method import selection
from unimedi_jax.train.loop import is_due


class Modality(NamedTuple):
    """One modality's held-out set with its embeddings."""

    arrays: np.ndarray  # images [N, H, W] or volumes [N, D, H, W], in [0, 1]
    labels: np.ndarray  # [N, F] multi-hot
    reports: list[str]
    image_emb: np.ndarray  # [N, E]
    text_emb: np.ndarray  # [N, E]
    lesion_slices: np.ndarray | None  # [N, D] for volumes with ground truth


class EvalSet(NamedTuple):
    dataset: str  # the source name, which selects zero-shot prompts
    modalities: dict[str, Modality]  # 'image' and/or 'volume'
    sources: dict[str, str]  # 'image' / 'volume' -> the source each was read from
    config: ml_collections.ConfigDict  # where the data lives
    limit: int  # records read per modality and split


def load_modality(model, config, name: str, modality: str, split: str, limit: int) -> Modality:
    """Reads up to ``limit`` records of a split and embeds images/volumes and reports."""
    key = "image" if modality == "2d" else "volume"
    arrays, labels, reports, lesions = [], [], [], []
    for batch in eval_batches(config, name, modality, split):
        arrays.append(batch[key])
        labels.append(batch["labels"])
        reports.extend(batch["report"])
        if "lesion_slices" in batch:
            lesions.append(batch["lesion_slices"])
        if len(reports) >= limit:
            break
    arrays = np.concatenate(arrays)[:limit]
    embed = model.embed_images if key == "image" else model.embed_volumes
    return Modality(
        arrays=arrays,
        labels=np.concatenate(labels)[:limit],
        reports=reports[:limit],
        image_emb=embed(arrays),
        text_emb=model.embed_texts(reports[:limit]),
        lesion_slices=np.concatenate(lesions)[:limit] if lesions else None,
    )


def build_eval_set(model, config, split: str = "test", limit: int = 200) -> EvalSet:
    """Embeds the first configured source of each modality (the demo: held-out phantoms)."""
    configured = {"2d": config.data.sources_2d, "3d": config.data.sources_3d}
    modalities, sources, dataset = {}, {}, ""
    for modality, text in configured.items():
        if not text:
            continue
        name = parse_sources(text)[0][0]
        dataset = dataset or name
        key = "image" if modality == "2d" else "volume"
        modalities[key] = load_modality(model, config, name, modality, split, limit)
        sources[key] = name
    return EvalSet(dataset, modalities, sources, config, limit)


def retrieval(model, data: EvalSet) -> dict[str, float]:
    """Image<->report Recall@1/5/10 per modality (identical reports count as positives)."""
    out = {}
    for key, m in data.modalities.items():
        found = metrics.retrieval_metrics(m.image_emb, m.text_emb, text_ids=m.reports)
        out.update({f"retrieval_{key}/{name}": value for name, value in found.items()})
    return out


def _zero_shot_scorer(model, source: str) -> Callable[[np.ndarray, np.ndarray], dict]:
    """(labels, embeddings) -> per-finding AUROC (and their mean) by the positive-vs-negative
    prompt ``pairs`` of ``source``'s prompt file, its prompts embedded once."""
    prompts = zero_shot_prompts.load_prompts(zero_shot_prompts.prompts_path(source))
    names = list(prompts.pairs)
    columns = zero_shot_prompts.label_columns(
        names, zero_shot_prompts.label_names(source), prompts.path
    )
    positive = model.embed_texts([prompts.pairs[n][0] for n in names])
    negative = model.embed_texts([prompts.pairs[n][1] for n in names])

    def score(labels: np.ndarray, emb: np.ndarray) -> dict[str, float]:
        scores = metrics.zero_shot_scores(emb, positive, negative)
        return zero_shot_metrics.per_label_auroc(labels[:, columns], scores, names)

    return score


def zero_shot(model, data: EvalSet) -> dict[str, float]:
    """Per-finding AUROC of positive-vs-negative prompts, per modality: the ``pairs`` of each
    evaluated source's prompt file (``configs/prompts/<source>.json``); each finding on the
    records that state it (uncertain and blank labels left out)."""
    out = {}
    for key, m in data.modalities.items():
        found = _zero_shot_scorer(model, data.sources[key])(m.labels, m.image_emb)
        out.update({f"zero_shot_{key}/{name}": value for name, value in found.items()})
    return out


def cross_modal(model, data: EvalSet) -> dict[str, float]:
    """mAP of X-ray -> CT and CT -> X-ray retrieval by shared finding (a common space test)."""
    if len(data.modalities) < 2:
        return {}
    image, volume = data.modalities["image"], data.modalities["volume"]
    return {
        "cross_modal/image_to_volume_mAP": metrics.label_map(
            image.image_emb, image.labels, volume.image_emb, volume.labels
        ),
        "cross_modal/volume_to_image_mAP": metrics.label_map(
            volume.image_emb, volume.labels, image.image_emb, image.labels
        ),
    }


def modality_distance(model, data: EvalSet) -> dict[str, float]:
    """X-ray vs CT centroid distance per shared finding, relative to the groups' spread (the
    paper's Figs. 2/7 claim that UniMedI brings them together; lower is closer)."""
    if len(data.modalities) < 2:
        return {}
    image, volume = data.modalities["image"], data.modalities["volume"]
    return {
        "cross_modal/distance_2d_3d": metrics.modality_distance(
            image.image_emb, image.labels, volume.image_emb, volume.labels
        )
    }


def slice_hit_rate(model, data: EvalSet) -> dict[str, float]:
    """Fraction of attentively selected slices inside the lesion, next to random selection; the
    same per finding (``/<finding>``) over the volumes with that finding alone, so that a small
    lesion is not hidden behind the large ones."""
    volume = data.modalities.get("volume")
    if volume is None or volume.lesion_slices is None:
        return {}
    selected, _ = model.select_slices(volume.arrays)
    hit, chance = metrics.slice_hit_rate(selected, volume.lesion_slices)
    out = {"slice_selection/hit_rate": hit, "slice_selection/random_hit_rate": chance}
    names = zero_shot_prompts.label_names(data.sources["volume"])
    positive = np.nan_to_num(np.asarray(volume.labels, np.float64)) == 1.0
    if positive.shape[1] != len(names):
        return out
    single = positive.sum(axis=1) == 1
    for column, name in enumerate(names):
        alone = positive[:, column] & single
        if alone.any():
            hit, chance = metrics.slice_hit_rate(selected[alone], volume.lesion_slices[alone])
            out[f"slice_selection/hit_rate/{name}"] = hit
            out[f"slice_selection/random_hit_rate/{name}"] = chance
    return out


SLICE_CHOICES = ("none", "random", "oracle")


def slice_choice(model, data: EvalSet) -> dict[str, float]:
    """CT zero-shot (as ``zero_shot``) with the slices of the joint pass chosen otherwise than
    by Eq. 2: none (the volume alone), at random, or inside the ground-truth lesions (the
    phantoms), as ``slice_choice/<choice>/...``. Beside ``zero_shot_volume/...`` this says
    whether the slices carry what the model knows and whether better slices would help."""
    volume = data.modalities.get("volume")
    if volume is None or volume.lesion_slices is None:
        return {}
    count, depth = volume.lesion_slices.shape
    k = model.config.selection.k
    rng = jax.random.key(0)
    lesion = jnp.asarray(volume.lesion_slices, bool)
    indices = {
        "none": np.zeros((count, 0), np.int32),
        "random": np.asarray(selection.random_slices(rng, count, depth, k)),
        "oracle": np.asarray(selection.oracle_slices(rng, lesion, k)),
    }
    score = _zero_shot_scorer(model, data.sources["volume"])
    out = {}
    for choice in SLICE_CHOICES:
        emb = model.embed_volumes(volume.arrays, slice_indices=indices[choice])
        found = score(volume.labels, emb)
        out.update({f"slice_choice/{choice}/{name}": value for name, value in found.items()})
    return out


def linear_probe(model, data: EvalSet) -> dict[str, float]:
    """Linear probe on frozen [CLS] features of each evaluated source's own labels at 1, 10 and
    100% of its training split (the paper's protocol, sized for a run): up to
    ``probe_train_limit`` training records, the evaluator's limit of validation and test records.
    The same probe as ``downstream.probe`` (the paper's tables)."""
    config = data.config
    limits = {"train": config.probe_train_limit, "val": data.limit, "test": data.limit}
    out = {}
    for key, name in data.sources.items():
        modality = "2d" if key == "image" else "3d"
        spec, stored, _ = builders.resolve(name, modality)
        task = tasks.resolve(name if len(spec.modalities) == 1 else f"{spec.name}/{stored}")
        sources = {
            role: open_source(task.name, config.data.data_dir, modality, split)
            for role, split in tasks.SPLITS.items()
        }
        features = downstream.probe_features(model, config, task, sources, limits)
        results = run_probe(features, task.task, tasks.FRACTIONS)
        for fraction, scores in results.items():
            out[f"linear_probe_{key}/{task.metric}@{fraction:g}"] = scores[task.metric]
    return out


EVALUATORS: dict[str, Callable[[trained_model.UniMedIInference, EvalSet], dict[str, float]]] = {
    "retrieval": retrieval,
    "zero_shot": zero_shot,
    "cross_modal": cross_modal,
    "modality_distance": modality_distance,
    "slice_hit_rate": slice_hit_rate,
    "slice_choice": slice_choice,
    "linear_probe": linear_probe,
}


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One configured evaluator: what it computes, how often in the loop, on what data."""

    name: str
    fn: Callable[[trained_model.UniMedIInference, EvalSet], dict[str, float]]
    every_steps: int  # 0: never in the loop (``python -m unimedi_jax.evaluate`` still runs it)
    split: str
    limit: int  # records per modality

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the loop runs it after ``step``: every ``every_steps`` and at the last step."""
        return self.every_steps > 0 and is_due(step, self.every_steps, total_steps)


def from_config(config: ml_collections.ConfigDict) -> list[Evaluator]:
    """The evaluators ``config.evals`` names, with their settings; unknown names fail here, at
    the start of a run or command."""
    names = tuple(config.evals)
    unknown = sorted(set(names) - set(EVALUATORS))
    if unknown:
        raise ConfigError(
            f"evals={names} names unknown evaluators {unknown}; valid: {sorted(EVALUATORS)}."
        )
    evaluators = []
    for name in names:
        settings = config.eval_settings[name]
        evaluators.append(
            Evaluator(
                name,
                EVALUATORS[name],
                config.eval_every_steps if settings.every_steps < 0 else settings.every_steps,
                settings.split or config.eval_split,
                config.eval_limit if settings.limit < 0 else settings.limit,
            )
        )
    return evaluators


def run_evaluators(
    model: trained_model.UniMedIInference,
    config: ml_collections.ConfigDict,
    evaluators: Sequence[Evaluator],
) -> dict[str, float]:
    """Runs ``evaluators``, embedding each held-out split and limit they read once."""
    eval_sets: dict[tuple[str, int], EvalSet] = {}
    results: dict[str, float] = {}
    for evaluator in evaluators:
        key = (evaluator.split, evaluator.limit)
        if key not in eval_sets:
            eval_sets[key] = build_eval_set(model, config, *key)
        results.update(evaluator.fn(model, eval_sets[key]))
    return results


def evaluate_checkpoint(path: str | Path, config=None) -> dict[str, float]:
    """Loads the checkpoint at ``path`` and runs every evaluator the config names (``config``:
    the run's own when None), with the vision tower the config names; the figures come with
    the ``step`` of the checkpoint read, which a run's folder alone does not say."""
    model = trained_model.load(path, vision_weights=config.vision_weights if config else None)
    if config is None:
        config = model.config
    elif not config.data.data_dir:
        config.data.data_dir = model.config.data.data_dir  # a demo run's data lives in its workdir
    return {"step": model.step, **run_evaluators(model, config, from_config(config))}
