"""The zero-shot benchmarks' own metrics, as their reference code computes them: CT-CLIP's
threshold, F1 and bootstrap AUROC intervals, its report-to-volume recall and volume-to-volume MAP,
GLoRIA's class scoring, MGCA's precision@k.

Numpy only, on embeddings and labels already computed; the retrieval, AUROC and accuracy they
share with the other evaluators are ``metrics.py``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from unimedi_jax.evaluation import metrics

THRESHOLDS = np.linspace(0.0, 1.0, 100)  # CT-CLIP's threshold grid (bootstrap_values.py)


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
        "mean_auroc": metrics.mean_of_defined(list(found.values())),
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
        "mean_auroc": metrics.mean_of_defined([v["auroc"] for v in classes.values()]),
        "mean_auroc_ci": interval(boot_mean, level),
    }
    for key in ("f1", "precision", "recall", "accuracy"):
        out[f"mean_{key}"] = metrics.mean_of_defined([v[key] for v in classes.values()])
    out["classes"] = classes
    return out


def _unit(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, np.float64)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def ct_clip_report_to_volume(
    report_emb: np.ndarray, volume_emb: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """CT-CLIP's report-to-volume recall@K (scripts/report_to_volume_new.py): report i hits
    when its own volume i is among the K volumes of highest cosine similarity (a copy of its
    text elsewhere does not count); ties rank the lower index first, as the script's stable
    sort does; the share of reports that hit. K above the number of volumes, which the script
    refuses, is NaN. Keys 'report_to_volume/R@K' and their chance level K / N."""
    sim = _unit(report_emb) @ _unit(volume_emb).T
    n = len(sim)
    own = np.diag(sim)[:, None]
    earlier = np.tri(n, k=-1, dtype=bool)  # [i, j]: j < i, ranked ahead of i on a tie
    ahead = ((sim > own) | ((sim == own) & earlier)).sum(1)
    out = {}
    for k in ks:
        out[f"report_to_volume/R@{k}"] = float(np.mean(ahead < k)) if k <= n else math.nan
        out[f"report_to_volume/chance/R@{k}"] = k / n if k <= n else math.nan
    return out


def ct_clip_volume_to_volume(
    volume_emb: np.ndarray, labels: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """CT-CLIP's volume-to-volume MAP@K over the abnormality labels (scripts/volume_to_volume
    *.py): the gallery is every volume with at least one positive label (the query itself
    included); for each query the K gallery volumes of highest cosine similarity (ties: lower
    index first) each score |both positive| / |positive in either| of their labels; MAP@K is
    the mean over queries of their mean over the K. The script keeps one list across its K
    values, so the figure it prints for the j-th K is the mean of MAP@K over the first j:
    'volume_to_volume_as_printed/MAP@K'. Volumes whose labels are not all 0/1 take no part."""
    labels = definite_labels(labels)
    known = ~np.isnan(labels).any(1)
    positive = labels[known] == 1
    emb = np.asarray(volume_emb)[known]
    in_gallery = positive.any(1)
    if not in_gallery.any():  # no volume with a positive label: nothing to retrieve
        return {f"{name}/MAP@{k}": math.nan for k in ks
                for name in ("volume_to_volume", "volume_to_volume_as_printed")}  # fmt: skip
    sim = _unit(emb) @ _unit(emb[in_gallery]).T
    order = np.argsort(-sim, axis=1, kind="stable")
    both = positive.astype(np.int64) @ positive[in_gallery].T.astype(np.int64)
    either = positive.sum(1)[:, None] + positive[in_gallery].sum(1)[None, :] - both
    overlap = np.take_along_axis(both / either, order, axis=1)
    out: dict[str, float] = {}
    printed: list[float] = []
    for k in ks:
        out[f"volume_to_volume/MAP@{k}"] = float(overlap[:, :k].mean(1).mean())
        printed.append(out[f"volume_to_volume/MAP@{k}"])
        out[f"volume_to_volume_as_printed/MAP@{k}"] = float(np.mean(printed))
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
