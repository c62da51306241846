"""Zero-shot classification and retrieval on the field's benchmarks, with their metric code.

Protocols (``python -m unimedi_jax.evaluate --config=configs/zero_shot.py:dataset=NAME``):

- ``ct_rate``: CT-CLIP's (Hamamci et al. 2024, github.com/ibrahimethemhamamci/CT-CLIP,
  scripts/zero_shot.py, eval.py, bootstrap_values.py) on CT-RATE's validation volumes (our
  ``test`` split): per abnormality the prompts '<abnormality>.' and 'not <abnormality>.', a
  softmax over the pair of image-text logits (cosine similarity times the model's learned logit
  scale), the positive's probability as the score. AUROC per abnormality and their mean with 95%
  bootstrap intervals over volumes; weighted F1, precision, recall and accuracy at CT-CLIP's
  threshold (``ct_clip_threshold``); volume<->report recall@{1,5,10,50}.
- ``rsna_pneumonia``: pneumonia against normal prompts on the probe's test split, GLoRIA's class
  scoring (``class_scores``): AUROC, accuracy and F1.
- ``chexpert_5x200``, ``mimic_5x200``: GLoRIA's (Huang et al. 2021, github.com/marshuang80/
  gloria) 5x200 set (``draw_5x200``: 200 images per class positive for exactly that one of
  Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion and 0 or blank for every other
  label the records hold (an uncertain -1 leaves an image out), drawn with a fixed seed and
  listed in eval.json), GLoRIA's template prompts and class scoring: accuracy of the argmax over
  the five and per-class precision, recall and F1; MIMIC adds image-to-text precision@{5,10,50}
  (a report is relevant when its image has the query's class), overall and by class.

Prompts are data: ``configs/prompts/<benchmark>.json`` (``pairs``: label -> [positive,
negative]; or ``classes``: class -> [prompt, ...] or GLoRIA's template parts), replaced with
``--config.prompts=FILE.json``. A file's ``cross_modal`` section words the labels shared with the
other modality as that modality's reports do (CT findings in X-ray wording and the reverse):
scored beside the dataset's own prompts, a test of UniMedI's one space for both. Embeddings
come from ``trained_model`` (the one prediction path); the data check is the probe's
(``downstream.open_checked_split`` -> ``pipeline.open_for_model``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from data_pipelines import builders, pipeline
from unimedi_jax.core.errors import UserError
from unimedi_jax.core.overrides import packaged_config_dir
from unimedi_jax.evaluation import downstream, metrics, tasks, trained_model
from unimedi_jax.method.losses import cap_logit_scale

PROMPTS_DIR = packaged_config_dir() / "prompts"  # configs/prompts, in a checkout or a wheel
# The builder attribute naming each label column, where it is not CLASS_NAMES.
_LABEL_NAMES = {"ct_rate": "ABNORMALITIES", "mimic_cxr_jpg": "CHEXPERT_LABELS"}
THRESHOLDS = np.linspace(0.0, 1.0, 100)  # CT-CLIP's threshold grid (bootstrap_values.py)
RETRIEVAL_KS = (1, 5, 10, 50)
PRECISION_KS = (5, 10, 50)  # MIMIC 5x200 image-to-text retrieval (MGCA's)


class PromptError(UserError, ValueError):
    """A prompt file that cannot be read or does not fit the dataset's labels."""


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A prompt file: positive/negative pairs per label, or a list of prompts per class."""

    path: Path
    pairs: dict[str, tuple[str, str]]
    classes: dict[str, tuple[str, ...]]
    # The labels shared with the other modality, worded like its reports ("cross_modal").
    cross_modal: Prompts | None = None


def prompts_path(dataset: str) -> Path:
    """The shipped prompt file of ``dataset`` (NAME or NAME/CONFIG): configs/prompts/NAME.json."""
    return PROMPTS_DIR / f"{dataset.split('/')[0]}.json"


def load_prompts(path: str | Path) -> Prompts:
    """Reads and checks a prompt file; a file a person wrote gets one clear error per mistake."""
    path = Path(path)
    usage = (
        'a JSON object with "pairs": {"<label>": ["<positive>", "<negative>"], ...} or '
        '"classes": {"<class>": ["<prompt>", ...], ...}'
    )
    if not path.is_file():
        raise PromptError(
            f"prompt file {path} does not exist: pass --config.prompts=FILE.json, {usage} "
            f"(shipped ones: {PROMPTS_DIR})"
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PromptError(f"prompt file {path} is not valid JSON ({err}): write {usage}") from None
    if not isinstance(content, dict):
        raise PromptError(f"prompt file {path} is not {usage}")
    cross = content.get("cross_modal")
    if cross is not None and not isinstance(cross, dict):
        raise PromptError(f'prompt file {path}: "cross_modal" must be an object like the file')
    return dataclasses.replace(
        _parse(content, path, usage),
        cross_modal=_parse(cross, path, usage) if cross is not None else None,
    )


def _parse(content: dict, path: Path, usage: str) -> Prompts:
    pairs, classes = content.get("pairs", {}), content.get("classes", {})
    ok_pairs = isinstance(pairs, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) and s for s in v)
        for v in pairs.values()
    )
    ok_classes = isinstance(classes, dict) and all(
        _prompt_list(v) or _template(v) for v in classes.values()
    )
    if not ok_pairs or not ok_classes or not (pairs or classes):
        raise PromptError(
            f"prompt file {path} is not {usage} (or, for a class, GLoRIA's template parts: "
            '{"severity": [...], "subtype": [...], "location": [...]}), with non-empty prompts'
        )
    return Prompts(
        path,
        {k: (v[0], v[1]) for k, v in pairs.items()},
        {k: expand(v) for k, v in classes.items()},
    )


def _prompt_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(s, str) and s.strip() for s in value)
    )


def _template(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, list) and v and all(isinstance(s, str) for s in v)
                for v in value.values())
        and bool(expand(value))
    )  # fmt: skip


def expand(value: list[str] | dict[str, list[str]]) -> tuple[str, ...]:
    """A class's prompts: a list as given, or GLoRIA's template parts (generate_chexpert_class_
    prompts) as every combination joined with spaces in the order of the parts (all of them,
    where GLoRIA samples some); spaces collapsed, repeats dropped."""
    if isinstance(value, list):
        combos = [[s] for s in value]
    else:
        combos = [[]]
        for part in value.values():
            combos = [[*c, s] for c in combos for s in part]
    return tuple(dict.fromkeys(filter(None, (" ".join(" ".join(c).split()) for c in combos))))


def label_names(dataset: str) -> tuple[str, ...]:
    """The names of a dataset's label columns, in column order, from its builder module."""
    spec, _ = builders.parse_name(dataset)
    return tuple(getattr(spec.load(), _LABEL_NAMES.get(spec.name, "CLASS_NAMES")))


def label_columns(names: Sequence[str], labels: Sequence[str], path: Path) -> list[int]:
    """The column of each prompted name among the dataset's ``labels``."""
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise PromptError(
            f"prompt file {path} names {unknown}, which are not labels of this dataset; its "
            f"labels: {list(labels)}"
        )
    return [list(labels).index(n) for n in names]


# ------------------------------------------------------------------------------------ metrics


def ct_clip_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """CT-CLIP's operating point (bootstrap_values.find_threshold): of 100 thresholds evenly
    spaced in [0, 1], predicting ``score > t``, the one nearest the ROC's ideal corner
    (minimal sqrt((1 - TPR)^2 + FPR^2)), the largest on ties. NaN when one class is missing."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return math.nan
    predicted = np.asarray(scores)[None, :] > THRESHOLDS[:, None]
    tpr = (predicted & labels).sum(1) / labels.sum()
    fpr = (predicted & ~labels).sum(1) / (~labels).sum()
    distance = np.sqrt((1.0 - tpr) ** 2 + fpr**2)
    return float(THRESHOLDS[np.flatnonzero(distance <= distance.min())[-1]])


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def threshold_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Binary figures of 0/1 predictions: 'f1' weighted by class support (CT-CLIP reports
    sklearn's average='weighted'), 'f1_positive', 'precision', 'recall' (of the positive class;
    0 when undefined, as sklearn) and 'accuracy'."""
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    tp = float(np.sum(labels & predicted))
    fp = float(np.sum(~labels & predicted))
    fn = float(np.sum(labels & ~predicted))
    tn = float(np.sum(~labels & ~predicted))
    positive, negative = _f1(tp, fp, fn), _f1(tn, fn, fp)
    return {
        "f1": (positive * (tp + fn) + negative * (tn + fp)) / labels.size,
        "f1_positive": positive,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "accuracy": (tp + tn) / labels.size,
    }


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap values (NaN ones dropped), as CT-CLIP's compute_cis
    picks it: of the m sorted values, those at int(m * tail) - 1 and int(m * (1 - tail)) - 1
    (the 25th and 975th of 1,000), the first for very few values."""
    values = np.sort(np.asarray(values, np.float64))
    values = values[~np.isnan(values)]
    if not values.size:
        return math.nan, math.nan
    tail = (1.0 - level) / 2
    index = lambda q: max(int(round(q * values.size, 9)) - 1, 0)
    return float(values[index(tail)]), float(values[index(1.0 - tail)])


def definite_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as float 1/0 with NaN where a record's label is neither: CheXpert's and MIMIC's
    uncertain (-1) and blank (NaN) cells, a CT-RATE volume without labels. Zero-shot AUROC
    scores each label on the records that state it, as CT-CLIP (whose labels are all 0/1) and
    the CheXpert-labelled benchmarks do."""
    labels = np.asarray(labels, np.float64)
    return np.where((labels == 0) | (labels == 1), labels, np.nan)


def _known_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC on the records whose label (from ``definite_labels``) is known."""
    known = ~np.isnan(labels)
    return metrics.auroc(labels[known].astype(bool), scores[known])


def per_label_auroc(
    labels: np.ndarray, scores: np.ndarray, names: Sequence[str]
) -> dict[str, float]:
    """{'mean_auroc', 'auroc/<name>'} of [N, C] zero-shot scores, each label on the records
    that state it (``definite_labels``); the mean over the labels where AUROC is defined."""
    labels = definite_labels(labels)
    found = {name: _known_auroc(labels[:, c], scores[:, c]) for c, name in enumerate(names)}
    return {
        "mean_auroc": _mean(list(found.values())),
        **{f"auroc/{n}": v for n, v in found.items()},
    }


def bootstrap_resamples(n: int, samples: int, seed: int) -> np.ndarray:
    """[samples, n] row indices drawn with replacement: the resamples of every interval."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap_auroc(
    labels: np.ndarray, scores: np.ndarray, samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AUROC [samples, C] and their macro mean [samples] over resampled rows (NaN
    labels, unknown, left out of their class)."""
    per_class = np.array(
        [
            [_known_auroc(labels[rows, c], scores[rows, c]) for c in range(labels.shape[1])]
            for rows in bootstrap_resamples(len(labels), samples, seed)
        ]
    ).reshape(samples, labels.shape[1])
    defined = ~np.isnan(per_class)
    counts = defined.sum(1)
    mean = np.where(
        counts > 0, np.where(defined, per_class, 0.0).sum(1) / np.maximum(counts, 1), np.nan
    )
    return per_class, mean


def _mean(values: Sequence[float]) -> float:
    """The mean of the defined (not NaN) values; NaN when there are none."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def multilabel_report(
    labels: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    samples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """CT-CLIP's figures of [N, C] scores: per class AUROC with its interval and the threshold
    figures at CT-CLIP's threshold; their macro means ('mean_auroc' with its interval). A label
    that is not 0/1 (``definite_labels``) leaves its record out of that class's figures."""
    labels = definite_labels(labels)
    boot_class, boot_mean = bootstrap_auroc(labels, scores, samples, seed)
    classes = {}
    for c, name in enumerate(names):
        known = ~np.isnan(labels[:, c])
        truth, score = labels[known, c].astype(bool), scores[known, c]
        threshold = ct_clip_threshold(truth, score)
        found = (
            threshold_metrics(truth, score > threshold)
            if not math.isnan(threshold)
            else dict.fromkeys(("f1", "f1_positive", "precision", "recall", "accuracy"), math.nan)
        )
        classes[name] = {
            "auroc": metrics.auroc(truth, score),
            "auroc_ci": interval(boot_class[:, c], level),
            "threshold": threshold,
            "positives": int(truth.sum()),
            "records": int(known.sum()),
            **found,
        }
    out: dict[str, Any] = {
        "mean_auroc": _mean([v["auroc"] for v in classes.values()]),
        "mean_auroc_ci": interval(boot_mean, level),
    }
    for key in ("f1", "precision", "recall", "accuracy"):
        out[f"mean_{key}"] = _mean([v[key] for v in classes.values()])
    out["classes"] = classes
    return out


def class_scores(image_emb: np.ndarray, prompt_emb: Sequence[np.ndarray]) -> np.ndarray:
    """GLoRIA's zero-shot class scores [N, C] (gloria.zero_shot_classification): each class's
    highest cosine similarity over its prompts, standardised per class over the images."""
    image = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    best = np.stack(
        [(image @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T).max(1) for p in prompt_emb], 1
    )
    if len(best) < 2:
        return best
    return (best - best.mean(0)) / np.maximum(best.std(0), 1e-12)


# ---------------------------------------------------------------------------------- protocols


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
    for batch in pipeline.eval_batches(eval_config, task.name, task.modality, split, batch_size):
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
    ['retrieval': {...}], ['selection': the 5x200 ids]}."""
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
    and image<->report retrieval."""
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
        out["zero_shot_cross_modal"] = {**cross, "own_prompts_mean_auroc": _mean(own)}
    if data["reports"]:
        key = "volume" if task.modality == "3d" else "image"
        found = metrics.retrieval_metrics(
            data["emb"], model.embed_texts(data["reports"]), RETRIEVAL_KS, data["reports"]
        )
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


def precision_at_k(
    query_emb: np.ndarray, gallery_emb: np.ndarray, query_class, gallery_class, ks
) -> dict[str, float]:
    """Mean over queries of the share of the k most similar gallery items of the query's class
    (ties broken by gallery order)."""
    query = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True)
    gallery = gallery_emb / np.linalg.norm(gallery_emb, axis=1, keepdims=True)
    order = np.argsort(-(query @ gallery.T), axis=1, kind="stable")
    hits = np.asarray(gallery_class)[order] == np.asarray(query_class)[:, None]
    return {f"P@{k}": float(hits[:, :k].mean()) for k in ks}


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
    for batch in pipeline.eval_batches(eval_config, task.name, task.modality, config.split):
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
    for batch in pipeline.eval_batches(
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
