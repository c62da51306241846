"""Evaluation metrics as pure numpy functions of embeddings, labels and scores.

Retrieval (image <-> report recall@k), AUROC and average precision, cross-modal label mAP
(X-ray queries against a CT gallery and back), zero-shot prompt scores, the hit rate of the
attentive slice selection, and multi-class accuracy. Nothing here depends on JAX or a model: the
inference code produces the arrays, these functions only score them, so they are cheap to test
against independent references.

Conventions:
- Similarities are cosine similarities of L2-normalised embeddings, computed in float64.
- Ranking ties are counted against the query: a negative whose similarity equals that of the best
  positive is ranked ahead of it. Results then do not depend on gallery order, and collapsed
  (constant) embeddings score the worst recall, never a lucky one.
- Metrics that are undefined for the data (AUROC with one class, AP with no positive) are NaN,
  and means skip the NaN entries.
"""

from collections.abc import Sequence

import numpy as np

_EPS = 1e-12
_QUERY_CHUNK = 1024  # Rows of the similarity matrix held in memory at once.


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}.")
    return x


def _l2_normalise(x: np.ndarray, name: str) -> np.ndarray:
    x = _as_2d(x, name).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has {a.shape[1]} columns but {name_b} has {b.shape[1]}; they must match "
            "(same embedding space, same label set)."
        )


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} has {a.shape[0]} rows but {name_b} has {b.shape[0]}; they must match."
        )


def _check_binary(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0/1 (or bool) values.")
    return labels.astype(bool)


def _check_finite(scores: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return scores


def _positives_matrix(positives: np.ndarray, n_query: int, n_gallery: int) -> np.ndarray:
    positives = np.asarray(positives)
    if positives.ndim == 1:
        if positives.shape[0] != n_query or not np.issubdtype(positives.dtype, np.integer):
            raise ValueError(
                f"positives as an index array must be integer with shape ({n_query},), "
                f"got {positives.dtype} {positives.shape}."
            )
        if positives.min(initial=0) < 0 or positives.max(initial=0) >= n_gallery:
            raise ValueError(f"positives indices must lie in [0, {n_gallery}).")
        matrix = np.zeros((n_query, n_gallery), bool)
        matrix[np.arange(n_query), positives] = True
        return matrix
    if positives.shape != (n_query, n_gallery):
        raise ValueError(
            f"positives must be a bool mask of shape ({n_query}, {n_gallery}) or an index array "
            f"of shape ({n_query},), got {positives.shape}."
        )
    matrix = _check_binary(positives, "positives")
    if not matrix.any(axis=1).all():
        raise ValueError(
            "Every query needs at least one positive; some rows of positives are empty."
        )
    return matrix


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}.")
    return ks


def recall_at_k(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    positives: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Fraction of queries with at least one positive among their k most similar gallery items.

    positives: bool [N, M] (several positives per query allowed) or int [N] (one positive index
    per query). Ties count against the query (module docstring). Returns {'R@k': value}.
    """
    ks = _check_ks(ks)
    query = _l2_normalise(query_emb, "query_emb")
    gallery = _l2_normalise(gallery_emb, "gallery_emb")
    _check_same_dim(query, gallery, "query_emb", "gallery_emb")
    positives = _positives_matrix(positives, query.shape[0], gallery.shape[0])

    ahead = np.empty(query.shape[0], np.int64)  # Negatives ranked ahead of the best positive.
    for start in range(0, query.shape[0], _QUERY_CHUNK):
        rows = slice(start, start + _QUERY_CHUNK)
        sim = query[rows] @ gallery.T
        best_positive = np.where(positives[rows], sim, -np.inf).max(axis=1)
        ahead[rows] = np.sum(~positives[rows] & (sim >= best_positive[:, None]), axis=1)
    return {f"R@{k}": float(np.mean(ahead < k)) for k in ks}


def random_recall_at_k(positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected recall@k of a uniformly random ranking: the chance level of ``recall_at_k``.

    A query with P positives among M gallery items misses them all in its top k with probability
    C(M - P, k) / C(M, k) (hypergeometric), so duplicates such as repeated normal reports raise
    the chance level above k / M; this says how far above chance a recall really is.
    """
    ks = _check_ks(ks)
    positives = _check_binary(positives, "positives")
    if positives.ndim != 2 or not positives.any(axis=1).all():
        raise ValueError("positives must be a bool [N, M] mask with a positive in every row.")
    n_gallery = positives.shape[1]
    n_negative = n_gallery - positives.sum(axis=1)
    out = {}
    for k in ks:
        # C(neg, k) / C(M, k) as a product of k ratios (no huge binomials); 0 once k > neg.
        steps = np.arange(min(k, n_gallery))
        miss = np.prod(np.clip(n_negative[:, None] - steps, 0, None) / (n_gallery - steps), axis=1)
        out[f"R@{k}"] = float(np.mean(1.0 - miss))
    return out


def _group_ids(ids: np.ndarray | Sequence, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"text_ids must have shape ({n},) (one id per pair), got {ids.shape}.")
    return np.unique(ids, return_inverse=True)[1]


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    text_ids: np.ndarray | Sequence | None = None,
) -> dict[str, float]:
    """Image->report and report->image recall@k for paired rows (image i goes with text i).

    Identical reports are common (e.g. 'No acute cardiopulmonary process.'), and retrieving a
    copy of the right report is not an error: pass `text_ids` (the report strings themselves or
    any hashable group ids) and every pair whose text shares the id counts as a positive, in both
    directions. Keys: 'image_to_text/R@k', 'text_to_image/R@k' and their chance level under a
    random ranking, 'chance/R@k' (the same both ways: the positives are symmetric).
    """
    image = _as_2d(image_emb, "image_emb")
    text = _as_2d(text_emb, "text_emb")
    _check_same_length(image, text, "image_emb", "text_emb")
    n = image.shape[0]
    if text_ids is None:
        positives = np.eye(n, dtype=bool)
    else:
        groups = _group_ids(text_ids, n)
        positives = groups[:, None] == groups[None, :]
    metrics = {}
    for name, query, gallery in (("image_to_text", image, text), ("text_to_image", text, image)):
        for key, value in recall_at_k(query, gallery, positives, ks).items():
            metrics[f"{name}/{key}"] = value
    for key, value in random_recall_at_k(positives, ks).items():
        metrics[f"chance/{key}"] = value
    return metrics


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ascending ranks; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def _check_label_score_pair(labels, scores, labels_name: str, scores_name: str):
    labels = _check_binary(labels, labels_name)
    scores = _check_finite(scores, scores_name)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"{labels_name} and {scores_name} must be 1-D of equal length, got "
            f"{labels.shape} and {scores.shape}."
        )
    return labels, scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic with average ranks for ties.

    Equals the trapezoidal ROC area (a tied positive/negative pair counts one half). NaN when
    only one class is present, since the ROC curve is then undefined.
    """
    labels, scores = _check_label_score_pair(labels, scores, "labels", "scores")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _check_label_score_matrices(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_2d(labels, "labels")
    scores = _as_2d(scores, "scores")
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels {labels.shape} and scores {scores.shape} must both be [N, C] of equal shape."
        )
    return labels, scores


def mean_of_defined(values: Sequence[float]) -> float:
    """The mean of the defined (not NaN) values; NaN when there are none."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def mean_auroc(
    labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str] | None = None
) -> tuple[float, dict[str | int, float]]:
    """Macro mean AUROC over the classes of a multi-label [N, C] problem, plus each class's.

    Classes with a single label value (NaN AUROC) are left out of the mean but kept in the
    per-class dict, keyed by class name when given, else by column index.
    """
    labels, scores = _check_label_score_matrices(labels, scores)
    keys = list(range(labels.shape[1])) if class_names is None else list(class_names)
    if len(keys) != labels.shape[1]:
        raise ValueError(f"class_names has {len(keys)} names for {labels.shape[1]} columns.")
    per_class = {key: auroc(labels[:, c], scores[:, c]) for c, key in enumerate(keys)}
    return mean_of_defined(list(per_class.values())), per_class


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the step precision-recall curve, sum over thresholds of dRecall * precision.

    Thresholds are the distinct scores, so tied items enter together and the result does not
    depend on their order (the definition of sklearn's average_precision_score). NaN when there
    is no positive.
    """
    labels, scores = _check_label_score_pair(labels, scores, "labels", "scores")
    if not labels.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_pos = np.cumsum(sorted_labels)[last_of_tie]
    precision = true_pos / (last_of_tie + 1.0)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _relevance(query_labels: np.ndarray, gallery_labels: np.ndarray, match_normal: bool):
    shared = (query_labels.astype(np.int64) @ gallery_labels.T.astype(np.int64)) > 0
    if not match_normal:
        return shared
    query_normal = ~query_labels.any(axis=1)
    gallery_normal = ~gallery_labels.any(axis=1)
    return shared | (query_normal[:, None] & gallery_normal[None, :])


def label_map(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    match_normal: bool = True,
) -> float:
    """Mean over queries of the average precision of the gallery ranked by cosine similarity.

    A gallery item is relevant to a query when they share at least one positive label, which
    lets X-ray queries be scored against a CT gallery (and back) through a common label set.
    With match_normal, two items without any positive label (normal studies) are also relevant
    to each other, so normal queries are scored too instead of having no relevant item. Queries
    with no relevant gallery item are left out of the mean.
    """
    query = _l2_normalise(query_emb, "query_emb")
    gallery = _l2_normalise(gallery_emb, "gallery_emb")
    _check_same_dim(query, gallery, "query_emb", "gallery_emb")
    query_labels = _check_binary(_as_2d(query_labels, "query_labels"), "query_labels")
    gallery_labels = _check_binary(_as_2d(gallery_labels, "gallery_labels"), "gallery_labels")
    _check_same_length(query, query_labels, "query_emb", "query_labels")
    _check_same_length(gallery, gallery_labels, "gallery_emb", "gallery_labels")
    _check_same_dim(query_labels, gallery_labels, "query_labels", "gallery_labels")

    aps = []
    for start in range(0, query.shape[0], _QUERY_CHUNK):
        rows = slice(start, start + _QUERY_CHUNK)
        sim = query[rows] @ gallery.T
        relevant = _relevance(query_labels[rows], gallery_labels, match_normal)
        aps.extend(average_precision(rel, s) for rel, s in zip(relevant, sim, strict=True))
    return mean_of_defined(aps)


def modality_distance(
    emb_a: np.ndarray,
    labels_a: np.ndarray,
    emb_b: np.ndarray,
    labels_b: np.ndarray,
    min_positives: int = 2,
) -> float:
    """How far apart two modalities place the same finding (the paper's Figs. 2 and 7).

    Per finding: the distance between the centroids of the (L2-normalised) embeddings of A's and
    B's samples positive for it, divided by the mean of the two groups' spreads (each group's mean
    distance to its own centroid). 0 means both modalities put the finding in one place; above 1
    the groups lie further apart than they are wide. Returns the mean over the findings with at
    least ``min_positives`` positives in both sets (NaN when none has).
    """
    a, b = _l2_normalise(emb_a, "emb_a"), _l2_normalise(emb_b, "emb_b")
    _check_same_dim(a, b, "emb_a", "emb_b")
    labels_a = _check_binary(_as_2d(labels_a, "labels_a"), "labels_a")
    labels_b = _check_binary(_as_2d(labels_b, "labels_b"), "labels_b")
    _check_same_length(a, labels_a, "emb_a", "labels_a")
    _check_same_length(b, labels_b, "emb_b", "labels_b")
    _check_same_dim(labels_a, labels_b, "labels_a", "labels_b")
    ratios = []
    for finding in range(labels_a.shape[1]):
        group_a, group_b = a[labels_a[:, finding]], b[labels_b[:, finding]]
        if min(len(group_a), len(group_b)) < max(min_positives, 2):
            continue
        centre_a, centre_b = group_a.mean(axis=0), group_b.mean(axis=0)
        spread = 0.5 * (
            np.linalg.norm(group_a - centre_a, axis=1).mean()
            + np.linalg.norm(group_b - centre_b, axis=1).mean()
        )
        ratios.append(np.linalg.norm(centre_a - centre_b) / max(spread, _EPS))
    return mean_of_defined(ratios)


def zero_shot_scores(
    image_emb: np.ndarray,
    positive_prompt_emb: np.ndarray,
    negative_prompt_emb: np.ndarray,
    logit_scale: float = 1.0,
) -> np.ndarray:
    """[N, C] probability of class c's positive prompt in a softmax over its (pos, neg) pair.

    The two-way softmax of scale * cosine similarities is sigmoid(scale * (s_pos - s_neg)). The
    scale (the model's learned CLIP temperature) only changes calibration, not per-class AUROC.
    """
    image = _l2_normalise(image_emb, "image_emb")
    positive = _l2_normalise(positive_prompt_emb, "positive_prompt_emb")
    negative = _l2_normalise(negative_prompt_emb, "negative_prompt_emb")
    _check_same_dim(image, positive, "image_emb", "positive_prompt_emb")
    if positive.shape != negative.shape:
        raise ValueError(
            f"positive_prompt_emb {positive.shape} and negative_prompt_emb {negative.shape} "
            "must both be [C, E]: one prompt pair per class."
        )
    margin = logit_scale * (image @ positive.T - image @ negative.T)
    return np.exp(-np.logaddexp(0.0, -margin))


def slice_hit_rate(selected: np.ndarray, lesion_slices: np.ndarray) -> tuple[float, float]:
    """How often selected slices fall on annotated lesion slices, and the chance level.

    selected: int [N, k] distinct slice indices per volume; lesion_slices: bool [N, D]. Only
    volumes with at least one lesion slice count. hit_rate is the mean over them of the fraction
    of their k slices that are lesion slices; random_expected is the same for k distinct slices
    drawn uniformly, which is |lesion| / D for each volume. Both NaN when no volume has a lesion.
    """
    selected = _as_2d(selected, "selected")
    lesion = _check_binary(_as_2d(lesion_slices, "lesion_slices"), "lesion_slices")
    _check_same_length(selected, lesion, "selected", "lesion_slices")
    depth = lesion.shape[1]
    if not np.issubdtype(selected.dtype, np.integer):
        raise ValueError(f"selected must hold integer slice indices, got {selected.dtype}.")
    if selected.size and (selected.min() < 0 or selected.max() >= depth):
        raise ValueError(f"selected slice indices must lie in [0, {depth}) (lesion_slices depth).")
    if (np.diff(np.sort(selected, axis=1), axis=1) == 0).any():
        raise ValueError("selected must hold distinct slice indices within each volume.")

    has_lesion = lesion.any(axis=1)
    if not has_lesion.any():
        return float("nan"), float("nan")
    hits = np.take_along_axis(lesion, selected, axis=1)[has_lesion]
    return float(hits.mean()), float(lesion[has_lesion].mean())


def _check_class_labels(labels: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integer with shape ({n},), got {labels.dtype} {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}) (the number of score columns).")
    return labels


def accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    """Top-1 accuracy of integer labels [N] against class scores [N, C] (argmax, first on ties)."""
    logits = _as_2d(logits, "logits")
    labels = _check_class_labels(labels, *logits.shape)
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def multiclass_auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest AUROC of integer labels [N] against class probabilities [N, C].

    Classes absent from labels are skipped. Pass probabilities (softmax), not logits: one-vs-rest
    ranks a single column, and a column of logits is not monotone in that class's probability.
    """
    probabilities = _as_2d(probabilities, "probabilities")
    labels = _check_class_labels(labels, *probabilities.shape)
    one_hot = labels[:, None] == np.arange(probabilities.shape[1])[None, :]
    return mean_auroc(one_hot, probabilities)[0]
