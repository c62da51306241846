"""Zero-shot classification and retrieval on the field's benchmarks: the protocols.

Protocols (``python -m unimedi_jax.evaluate --config=configs/zero_shot.py:dataset=NAME``):

- ``ct_rate``: CT-CLIP's (Hamamci et al. 2024, github.com/ibrahimethemhamamci/CT-CLIP,
  scripts/zero_shot.py, eval.py, bootstrap_values.py) on CT-RATE's validation volumes (our
  ``test`` split): per abnormality the prompts '<abnormality>.' and 'not <abnormality>.', a
  softmax over the pair of image-text logits (cosine similarity times the model's learned logit
  scale), the positive's probability as the score. AUROC per abnormality and their mean with 95%
  bootstrap intervals over volumes; weighted F1, precision, recall and accuracy at CT-CLIP's
  threshold (``zero_shot_metrics.ct_clip_threshold``); volume<->report recall@{1,5,10,50} (a
  copy of the report counts), and in ``ct_clip_retrieval`` CT-CLIP's own counts: report-to-volume
  recall@{5,10,50,100} (scripts/report_to_volume_new.py) and volume-to-volume MAP@{1,5,10,50}
  over the abnormality labels (scripts/volume_to_volume*.py).
- ``rsna_pneumonia``: pneumonia against normal prompts on the probe's test split, GLoRIA's class
  scoring (``zero_shot_metrics.class_scores``): AUROC, accuracy and F1.
- ``chexpert_5x200``, ``mimic_5x200``: GLoRIA's (Huang et al. 2021, github.com/marshuang80/
  gloria) 5x200 set (``draw_5x200``: 200 images per class positive for exactly that one of
  Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion and 0 or blank for every other
  label the records hold (an uncertain -1 leaves an image out), drawn with a fixed seed and
  listed in eval.json), GLoRIA's template prompts and class scoring: accuracy of the argmax over
  the five and per-class precision, recall and F1; MIMIC adds image-to-text precision@{5,10,50}
  (a report is relevant when its image has the query's class), overall and by class.

Prompts are data, read by ``zero_shot_prompts``: ``configs/prompts/<benchmark>.json``
(``pairs``: label -> [positive, negative]; or ``classes``: class -> [prompt, ...] or GLoRIA's
template parts), replaced with ``--config.prompts=FILE.json``. A file's ``cross_modal`` section
words the labels shared with the other modality as that modality's reports do (CT findings in
X-ray wording and the reverse): scored beside the dataset's own prompts, a test of UniMedI's one
space for both. Embeddings come from ``trained_model`` (the one prediction path); the data check
is the probe's (``downstream.open_checked_split`` -> ``sources.open_for_model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from data_pipelines import builders, eval_split
from unimedi_jax.evaluation import downstream, metrics, tasks, trained_model
from unimedi_jax.evaluation.zero_shot_metrics import (
    class_scores,
    ct_clip_report_to_volume,
    ct_clip_volume_to_volume,
    definite_labels,
    multilabel_report,
    precision_at_k,
    threshold_metrics,
)
from unimedi_jax.evaluation.zero_shot_prompts import (
    PromptError,
    Prompts,
    label_columns,
    label_names,
    load_prompts,
    prompts_path,
)
from unimedi_jax.method.losses import cap_logit_scale

RETRIEVAL_KS = (1, 5, 10, 50)
CT_CLIP_RECALL_KS = (5, 10, 50, 100)  # CT-CLIP's report-to-volume K (report_to_volume_new.py)
MAP_KS = (1, 5, 10, 50)  # CT-CLIP's volume-to-volume K (volume_to_volume*.py)
PRECISION_KS = (5, 10, 50)  # MIMIC 5x200 image-to-text retrieval (MGCA's)


def _logit_scale(model: trained_model.UniMedIInference) -> float:
    """The trained CLIP logit scale, capped as in training: CT-CLIP's softmax is over logits."""
    value = cap_logit_scale(
        model.student["logit_scale"]["value"], model.config.loss.max_logit_scale
    )
    return float(np.exp(np.asarray(value)))


def _embed_split(
    model: trained_model.UniMedIInference,
    eval_config: ml_collections.ConfigDict,
    task: tasks.Downstream,
    split: str,
    limit: int,
    batch_size: int,
) -> dict[str, Any]:
    """Embeddings and what the records hold (labels, reports) of up to ``limit`` records (0: all)
    of a split, read with the eval transforms batch by batch."""
    key = "image" if task.modality == "2d" else "volume"
    embed = model.embed_images if key == "image" else model.embed_volumes
    out: dict[str, list] = {"emb": [], task.label_key: [], "report": []}
    done = 0
    for batch in eval_split.eval_batches(eval_config, task.name, task.modality, split, batch_size):
        take = len(batch[key]) if limit <= 0 else min(limit - done, len(batch[key]))
        out["emb"].append(embed(batch[key][:take]))
        out[task.label_key].append(np.asarray(batch[task.label_key])[:take])
        out["report"].extend(batch.get("report", [])[:take])
        done += take
        if 0 < limit <= done:
            break
    return {
        "emb": np.concatenate(out["emb"]),
        "labels": np.concatenate(out[task.label_key]),
        "reports": out["report"],
    }


def _task(dataset: str) -> tasks.Downstream:
    """The labelled view of ``dataset``: the probe registry's, or CT-RATE's 18 labels."""
    if dataset in tasks.labelled_names():
        return tasks.resolve(dataset)
    _, _, modality = builders.resolve(dataset)
    return tasks.Downstream(dataset, modality, "multilabel", label_names(dataset))


def evaluate(config: ml_collections.ConfigDict, checkpoint: str | Path) -> dict[str, Any]:
    """Runs the protocol of ``config.benchmark`` on a checkpoint; returns eval.json's content:
    {'kind': 'zero_shot', 'benchmark', 'dataset', 'protocol', 'checkpoint', 'step', 'split',
    'prompts', 'records', 'zero_shot': {...}, ['zero_shot_cross_modal': {...}],
    ['retrieval': {...}], ['ct_clip_retrieval': {...}], ['selection': the 5x200 ids]}."""
    task = _task(config.dataset)
    prompts = load_prompts(config.prompts or prompts_path(config.benchmark))
    path = Path(checkpoint)
    workdir, _ = trained_model.resolve_run(path)
    eval_config = downstream.run_eval_config(workdir, config)
    downstream.open_checked_split(task, eval_config, config.split, path, pretrained=True)
    model = trained_model.load(path, config.batch_size)
    out: dict[str, Any] = {
        **downstream.describe(task, False, path, model.step),
        "kind": "zero_shot",
        "benchmark": config.benchmark,
        "protocol": config.protocol,
        "split": config.split,
        "prompts": str(prompts.path),
    }
    if config.protocol == "gloria_5x200":
        out.update(_five_by_200(model, prompts, task, eval_config, config))
    elif task.task == "multilabel":
        data = _embed_split(model, eval_config, task, config.split, config.limit, config.batch_size)
        out.update(_pairs_protocol(model, prompts, task, data, config))
    else:
        data = _embed_split(model, eval_config, task, config.split, config.limit, config.batch_size)
        out.update(_classes_protocol(model, prompts, task, data))
    return out


def default_out_dir(config: ml_collections.ConfigDict, checkpoint: str | Path) -> Path:
    """<run workdir>/zero_shot/<benchmark>."""
    workdir, _ = trained_model.resolve_run(checkpoint)
    return workdir / "zero_shot" / config.benchmark


def _pairs_protocol(model, prompts: Prompts, task, data: dict, config) -> dict[str, Any]:
    """CT-CLIP's: positive/negative softmax per label, bootstrap AUROC, threshold figures,
    image<->report retrieval and, for volumes, CT-CLIP's retrieval counts."""
    if not prompts.pairs:
        raise PromptError(f'{prompts.path} has no "pairs": the {task.name} protocol needs them')
    labels = definite_labels(
        data["labels"][:, label_columns(list(prompts.pairs), task.classes, prompts.path)]
    )
    labelled = ~np.isnan(labels).all(1)  # a record stating none of the labels scores nothing
    scale = _logit_scale(model)

    def report(pairs: dict[str, tuple[str, str]]) -> dict[str, Any]:
        names = list(pairs)
        columns = label_columns(names, task.classes, prompts.path)
        positive = model.embed_texts([pairs[n][0] for n in names])
        negative = model.embed_texts([pairs[n][1] for n in names])
        scores = metrics.zero_shot_scores(data["emb"][labelled], positive, negative, scale)
        truth = data["labels"][labelled][:, columns]
        return multilabel_report(
            truth, scores, names, config.bootstrap.samples, config.bootstrap.seed
        )

    out = {
        "records": len(labels),
        "records_unlabelled": int((~labelled).sum()),
        "logit_scale": scale,
        "bootstrap": {"samples": config.bootstrap.samples, "seed": config.bootstrap.seed},
        "zero_shot": report(prompts.pairs),
    }
    if prompts.cross_modal is not None and prompts.cross_modal.pairs:
        cross = report(prompts.cross_modal.pairs)
        own = [v["auroc"] for n, v in out["zero_shot"]["classes"].items() if n in cross["classes"]]
        out["zero_shot_cross_modal"] = {
            **cross,
            "own_prompts_mean_auroc": metrics.mean_of_defined(own),
        }
    if task.modality == "3d":
        out["ct_clip_retrieval"] = ct_clip_volume_to_volume(data["emb"], data["labels"], MAP_KS)
    if data["reports"]:
        key = "volume" if task.modality == "3d" else "image"
        reports = model.embed_texts(data["reports"])
        if key == "volume":
            out["ct_clip_retrieval"].update(
                ct_clip_report_to_volume(reports, data["emb"], CT_CLIP_RECALL_KS)
            )
        found = metrics.retrieval_metrics(data["emb"], reports, RETRIEVAL_KS, data["reports"])
        out["retrieval"] = {
            name.replace("image_to_text", f"{key}_to_report").replace(
                "text_to_image", f"report_to_{key}"
            ): value
            for name, value in found.items()
        }
    return out


def _classes_protocol(model, prompts: Prompts, task, data: dict) -> dict[str, Any]:
    """GLoRIA's: the class with the highest standardised prompt similarity; AUROC of the last
    class's margin over the others for a binary task, accuracy and F1."""
    if not prompts.classes:
        raise PromptError(f'{prompts.path} has no "classes": the {task.name} protocol needs them')
    label_columns(list(prompts.classes), task.classes, prompts.path)
    if set(prompts.classes) != set(task.classes):
        raise PromptError(
            f"{prompts.path} gives prompts for {list(prompts.classes)}; {task.name} needs one "
            f"entry per class: {list(task.classes)}"
        )
    order = list(task.classes)
    scores = class_scores(data["emb"], [model.embed_texts(list(prompts.classes[c])) for c in order])
    labels = data["labels"].astype(np.int64)
    predicted = scores.argmax(1)
    found: dict[str, Any] = {"accuracy": float(np.mean(predicted == labels))}
    if len(order) == 2:
        binary = threshold_metrics(labels == 1, predicted == 1)
        found.update(
            auroc=metrics.auroc(labels == 1, scores[:, 1] - scores[:, 0]),
            f1=binary["f1_positive"],
            precision=binary["precision"],
            recall=binary["recall"],
        )
    return {"records": len(labels), "zero_shot": found}


def draw_5x200(
    labels: np.ndarray, per_class: int, seed: int, where: str, others: np.ndarray | None = None
) -> np.ndarray:
    """GLoRIA's 5x200 set (preprocess_chexpert_5x200_data): for each of the C classes (columns
    of ``labels``), ``per_class`` rows drawn without replacement with ``seed`` among those whose
    row, blanks (NaN) read as 0, is exactly 1 for that class and 0 for every other class and
    every column of ``others`` (the other observations GLoRIA checks; not 'No Finding'): an
    uncertain (-1) cell anywhere leaves the row out. Returns [C, per_class] row indices (each
    class's sorted). Too few rows for a class is a PromptError naming ``where`` (the dataset and
    split) and the counts."""
    cells = np.nan_to_num(np.asarray(labels, np.float64), nan=0.0)
    rest = np.nan_to_num(np.asarray(others, np.float64), nan=0.0) if others is not None else None
    clear = (cells == 0) | (cells == 1)
    if rest is not None:
        clear &= (rest == 0).all(1, keepdims=True)
    only = clear.all(1, keepdims=True) & (cells == 1) & ((cells == 1).sum(1, keepdims=True) == 1)
    counts = only.sum(0)
    if counts.min() < per_class:
        raise PromptError(
            f"{where} has {dict(enumerate(counts.tolist()))} images positive for exactly one "
            f"class (by column); the 5x{per_class} set needs {per_class} each: prepare more of "
            "the dataset, set --config.split to a larger split or lower --config.per_class"
        )
    rng = np.random.default_rng(seed)
    return np.stack(
        [np.sort(rng.choice(np.flatnonzero(only[:, c]), per_class, replace=False))
         for c in range(labels.shape[1])]
    )  # fmt: skip


def _five_by_200(model, prompts: Prompts, task, eval_config, config) -> dict[str, Any]:
    """GLoRIA's CheXpert 5x200 protocol (and MGCA's MIMIC-CXR 5x200): zero-shot accuracy over
    the five classes and per-class figures; with reports, image-to-text precision@k by class."""
    if not prompts.classes:
        raise PromptError(f'{prompts.path} has no "classes": the 5x200 protocol needs them')
    names = list(prompts.classes)
    columns = label_columns(names, task.classes, prompts.path)
    # GLoRIA also requires the dataset's other observations (MIMIC's 14 CheXpert labels) at 0.
    other = [i for i, n in enumerate(task.classes) if i not in columns and n != "No Finding"]
    labels, ids = [], []
    for batch in eval_split.eval_batches(eval_config, task.name, task.modality, config.split):
        labels.append(np.asarray(batch[task.label_key]))
        ids.extend(batch.get("id", []))
    where = f"{task.name} split {config.split!r}"
    found = np.concatenate(labels)
    chosen = draw_5x200(found[:, columns], config.per_class, config.seed, where, found[:, other])
    rows = chosen.reshape(-1)
    truth = np.repeat(np.arange(len(names)), config.per_class)
    position = {int(r): i for i, r in enumerate(rows)}
    emb = np.zeros((len(rows), 0), np.float32)
    reports: list[str] = [""] * len(rows)
    start = 0
    for batch in eval_split.eval_batches(
        eval_config, task.name, task.modality, config.split, config.batch_size
    ):
        n = len(batch["image"])
        take = [i for i in range(n) if start + i in position]
        if take:
            found = model.embed_images(batch["image"][take])
            if emb.shape[1] == 0:
                emb = np.zeros((len(rows), found.shape[1]), np.float32)
            for i, e in zip(take, found, strict=True):
                emb[position[start + i]] = e
                if "report" in batch:
                    reports[position[start + i]] = batch["report"][i]
        start += n
    classify = lambda classes: class_scores(
        emb, [model.embed_texts(list(classes[c])) for c in names]
    ).argmax(1)
    predicted = classify(prompts.classes)
    per_class = {}
    for c, name in enumerate(names):
        binary = threshold_metrics(truth == c, predicted == c)
        per_class[name] = {
            "precision": binary["precision"],
            "recall": binary["recall"],
            "f1": binary["f1_positive"],
        }
    out: dict[str, Any] = {
        "records": len(rows),
        "selection": {
            "split": config.split,
            "per_class": config.per_class,
            "seed": config.seed,
            "ids": {n: [ids[r] for r in chosen[c]] for c, n in enumerate(names)} if ids else {},
        },
        "zero_shot": {"accuracy": float(np.mean(predicted == truth)), "classes": per_class},
    }
    if prompts.cross_modal is not None and prompts.cross_modal.classes:
        label_columns(list(prompts.cross_modal.classes), names, prompts.path)
        if set(prompts.cross_modal.classes) != set(names):
            raise PromptError(
                f'{prompts.path}: "cross_modal" needs prompts for each of {names} (argmax over '
                "the five)"
            )
        cross = classify(prompts.cross_modal.classes)
        out["zero_shot_cross_modal"] = {"accuracy": float(np.mean(cross == truth))}
    if all(reports):
        text = model.embed_texts(reports)
        out["retrieval"] = {
            "image_to_text": precision_at_k(emb, text, truth, truth, PRECISION_KS),
            "image_to_text_by_class": {
                name: precision_at_k(emb[truth == c], text, truth[truth == c], truth, PRECISION_KS)
                for c, name in enumerate(names)
            },
        }
    return out
