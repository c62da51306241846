"""Evaluators on held-out data: retrieval, zero-shot, cross-modal mAP, slice hit rate, probe.

Each evaluator reads embeddings from an ``EvalSet`` (computed once per evaluation) and returns a
flat dict of named figures, so results go straight to metrics.jsonl, TensorBoard and eval.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import ml_collections
import numpy as np

from data_pipelines import builders, pipeline
from data_pipelines.pipeline import eval_batches, parse_sources
from unimedi_jax import inference
from unimedi_jax.core.errors import ConfigError
from unimedi_jax.evaluation import downstream, linear_probe, metrics, tasks

# Zero-shot prompts per dataset: finding -> (positive, negative), worded like the reports.
ZERO_SHOT_PROMPTS: dict[str, dict[str, tuple[str, str]]] = {
    "phantoms": {
        "pleural_effusion_left": ("Left pleural effusion.", "No pleural effusion."),
        "pleural_effusion_right": ("Right pleural effusion.", "No pleural effusion."),
        "nodule": ("Pulmonary nodule.", "No pulmonary nodule."),
        "consolidation": ("There is consolidation.", "No focal consolidation."),
        "ground_glass_opacity": ("Ground-glass opacity.", "No ground-glass opacity."),
        "cardiomegaly": ("Cardiomegaly is present.", "The heart is normal in size."),
    },
}


PROBE_FRACTIONS = (0.01, 0.1, 1.0)
PROBE_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # probe role -> split


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
    config: ml_collections.ConfigDict  # where the data lives and how much to read


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
    return EvalSet(dataset, modalities, sources, config)


def retrieval(model, data: EvalSet) -> dict[str, float]:
    """Image<->report Recall@1/5/10 per modality (identical reports count as positives)."""
    out = {}
    for key, m in data.modalities.items():
        found = metrics.retrieval_metrics(m.image_emb, m.text_emb, text_ids=m.reports)
        out.update({f"retrieval_{key}/{name}": value for name, value in found.items()})
    return out


def zero_shot(model, data: EvalSet) -> dict[str, float]:
    """Per-finding AUROC of positive-vs-negative prompts, per modality."""
    prompts = ZERO_SHOT_PROMPTS.get(data.dataset)
    if prompts is None:
        raise ValueError(
            f"no zero-shot prompts for dataset {data.dataset!r}; known: {sorted(ZERO_SHOT_PROMPTS)}"
        )
    names = list(prompts)
    positive = model.embed_texts([prompts[n][0] for n in names])
    negative = model.embed_texts([prompts[n][1] for n in names])
    out = {}
    for key, m in data.modalities.items():
        scores = metrics.zero_shot_scores(m.image_emb, positive, negative)
        found = metrics.zero_shot_auroc(m.labels, scores, names)
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


def slice_hit_rate(model, data: EvalSet) -> dict[str, float]:
    """Fraction of attentively selected slices inside the lesion, next to random selection."""
    volume = data.modalities.get("volume")
    if volume is None or volume.lesion_slices is None:
        return {}
    selected, _ = model.select_slices(volume.arrays)
    hit, chance = metrics.slice_hit_rate(selected, volume.lesion_slices)
    return {"slice_selection/hit_rate": hit, "slice_selection/random_hit_rate": chance}


def frozen_probe(model, data: EvalSet) -> dict[str, float]:
    """Linear probe on frozen [CLS] features of each evaluated source's own labels at 1, 10 and
    100% of its training split (the paper's protocol, sized for a run): up to
    ``probe_train_limit`` training records, ``eval_limit`` validation and test records."""
    config = data.config
    limit = config.eval_limit
    limits = {"train": config.probe_train_limit, "val": limit, "test": limit}
    out = {}
    for key, name in data.sources.items():
        modality = "2d" if key == "image" else "3d"
        spec, stored, _ = builders.resolve(name, modality)
        task = tasks.resolve(name if len(spec.modalities) == 1 else f"{spec.name}/{stored}")
        features = {
            role: downstream.extract_features(
                model,
                config,
                task,
                pipeline.open_source(task.name, config.data.data_dir, modality, split),
                limits[role],
            )
            for role, split in PROBE_SPLITS.items()
        }
        results = linear_probe.run_probe(features, task.task, PROBE_FRACTIONS)
        for fraction, found in results.items():
            out[f"linear_probe_{key}/{task.metric}@{fraction:g}"] = found[task.metric]
    return out


EVALUATORS: dict[str, Callable[[object, EvalSet], dict[str, float]]] = {
    "retrieval": retrieval,
    "zero_shot": zero_shot,
    "cross_modal": cross_modal,
    "slice_hit_rate": slice_hit_rate,
    "linear_probe": frozen_probe,
}


def run_evaluators(model, config, names, split: str = "test", limit: int = 200) -> dict:
    """Runs the named evaluators on one embedded held-out set."""
    unknown = sorted(set(names) - set(EVALUATORS))
    if unknown:
        raise ConfigError(
            f"evals={tuple(names)} names unknown evaluators {unknown}; valid: {sorted(EVALUATORS)}."
        )
    data = build_eval_set(model, config, split, limit)
    results: dict[str, float] = {}
    for name in names:
        results.update(EVALUATORS[name](model, data))
    return results


def evaluate_checkpoint(path: str | Path, config=None) -> dict[str, float]:
    """Loads the checkpoint at ``path`` and runs the configured evaluators."""
    model = inference.load(path)
    if config is None:
        config = model.config
    elif not config.data.data_dir:
        config.data.data_dir = model.config.data.data_dir  # a demo run's data lives in its workdir
    return run_evaluators(model, config, config.evals, config.eval_split, config.eval_limit)
