"""Evaluation metrics against hand-built cases, brute-force loops and scikit-learn."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from unimedi_jax.evaluation import metrics


def _unit(*rows):
    x = np.asarray(rows, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- recall@k -------------------------------------------------------------------------------


def test_recall_at_k_hand_built():
    # Query 0's positive (g0) is its nearest item. Query 1's positive (g1) comes third, behind
    # g4 and g5. Query 2's positive (g2) ties with the negative g3, so it counts as second.
    query = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    gallery = _unit([1, 0.2, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0], [0.2, 1, 0])
    got = metrics.recall_at_k(query, gallery, np.array([0, 1, 2]), ks=(1, 2, 3))
    assert got == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}


def _brute_force_recall(query, gallery, positives, k):
    """Sort each row with ties broken against the query (negatives first), then look at top k."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    hits = 0
    for i in range(q.shape[0]):
        sim = [float(q[i] @ g[j]) for j in range(g.shape[0])]
        order = sorted(range(g.shape[0]), key=lambda j: (-sim[j], bool(positives[i, j])))
        hits += any(positives[i, j] for j in order[:k])
    return hits / q.shape[0]


@pytest.mark.parametrize("quantise", [False, True])
def test_recall_at_k_matches_brute_force(quantise):
    rng = np.random.default_rng(0)
    query = rng.normal(size=(30, 4))
    gallery = rng.normal(size=(40, 4))
    if quantise:  # Small integer vectors give many exact ties, incl. duplicates.
        query, gallery = np.sign(np.round(query)), np.sign(np.round(gallery))
        query[query.sum(1) == 0, 0] = 1
        gallery[np.abs(gallery).sum(1) == 0, 0] = 1
    positives = rng.random((30, 40)) < 0.08
    positives[np.arange(30), rng.integers(0, 40, 30)] = True
    got = metrics.recall_at_k(query, gallery, positives, ks=(1, 3, 10))
    for k in (1, 3, 10):
        assert got[f"R@{k}"] == pytest.approx(_brute_force_recall(query, gallery, positives, k))


def test_recall_at_k_collapsed_embeddings_score_zero_at_1():
    emb = np.ones((5, 3))
    assert metrics.recall_at_k(emb, emb, np.arange(5), ks=(1, 5))["R@1"] == 0.0
    assert metrics.recall_at_k(emb, emb, np.arange(5), ks=(1, 5))["R@5"] == 1.0


def test_recall_at_k_shape_errors():
    with pytest.raises(ValueError, match="query_emb has 3 columns but gallery_emb has 4"):
        metrics.recall_at_k(np.ones((2, 3)), np.ones((2, 4)), np.arange(2))
    with pytest.raises(ValueError, match="positives"):
        metrics.recall_at_k(np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="at least one positive"):
        metrics.recall_at_k(np.eye(2), np.eye(2), np.array([[True, False], [False, False]]))


def test_retrieval_metrics_paired_and_duplicate_reports():
    image = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # Texts 1 and 2 are the same report: identical embeddings, nearest to image 1.
    text = _unit([1, 0, 0], [0, 1, 0.1], [0, 1, 0.1])
    plain = metrics.retrieval_metrics(image, text, ks=(1,))
    # Images 1 and 2 each tie their own report with its copy, which counts against them.
    assert plain["image_to_text/R@1"] == pytest.approx(1 / 3)
    ids = ["a", "same report", "same report"]
    grouped = metrics.retrieval_metrics(image, text, ks=(1,), text_ids=ids)
    assert grouped["image_to_text/R@1"] == 1.0
    assert grouped["text_to_image/R@1"] == 1.0
    with pytest.raises(ValueError, match="text_ids"):
        metrics.retrieval_metrics(image, text, text_ids=["a", "b"])
    with pytest.raises(ValueError, match="image_emb has 3 rows but text_emb has 2"):
        metrics.retrieval_metrics(image, text[:2])


def test_random_recall_equals_enumeration_over_all_rankings():
    positives = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    rankings = list(itertools.permutations(range(5)))
    for k in (1, 2, 3, 6):
        found = [np.mean([row[list(order[:k])].any() for order in rankings]) for row in positives]
        chance = metrics.random_recall_at_k(positives, ks=(k,))[f"R@{k}"]
        assert chance == pytest.approx(np.mean(found), abs=1e-12)
    assert metrics.random_recall_at_k(np.eye(200, dtype=bool), ks=(10,))["R@10"] == pytest.approx(
        0.05
    )
    with pytest.raises(ValueError, match="positive in every row"):
        metrics.random_recall_at_k(np.zeros((2, 2), bool))


def test_retrieval_metrics_report_their_chance_level():
    image = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    ids = ["a", "same report", "same report"]
    found = metrics.retrieval_metrics(image, image, ks=(1,), text_ids=ids)
    # Query "a" has 1 positive of 3, the other two have 2 of 3.
    assert found["chance/R@1"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)


# ---- AUROC and AP ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # Rounding makes many ties.
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_single_class_is_nan_and_mean_skips_it():
    assert np.isnan(metrics.auroc(np.ones(4), np.arange(4.0)))
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.5], [0.1, 0.7]])
    mean, per_class = metrics.mean_auroc(labels, scores, class_names=["a", "b"])
    assert mean == 1.0 and per_class["a"] == 1.0 and np.isnan(per_class["b"])


def test_mean_auroc_matches_sklearn_macro():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (100, 4))
    scores = rng.random((100, 4)) + 0.5 * labels
    mean, per_class = metrics.mean_auroc(labels, scores)
    assert mean == pytest.approx(roc_auc_score(labels, scores, average="macro"))
    assert per_class[2] == pytest.approx(roc_auc_score(labels[:, 2], scores[:, 2]))
    with pytest.raises(ValueError, match="equal shape"):
        metrics.mean_auroc(labels, scores[:, :3])


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = np.round(rng.normal(size=150) + labels, 1)
    expected = average_precision_score(labels, scores)
    assert metrics.average_precision(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_average_precision_hand_computed():
    # Ranking: pos, neg, pos -> AP = (1/2)(1) + (1/2)(2/3).
    assert metrics.average_precision([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(5 / 6)
    assert np.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))


# ---- label mAP ------------------------------------------------------------------------------


def test_label_map_hand_built():
    # Labels: [pneumonia, effusion]. Query 0 (pneumonia) ranks: g0 (effusion), g1 (pneumonia +
    # effusion), g2 (normal). Relevant: g1 only -> AP 1/2. Query 1 (normal) ranks g2 first and
    # is relevant only to g2 -> AP 1 with match_normal, excluded without.
    query = _unit([1, 0, 0], [0, 0, 1])
    gallery = _unit([1, 0.1, 0], [1, 0.5, 0], [0, 0, 1])
    query_labels = np.array([[1, 0], [0, 0]])
    gallery_labels = np.array([[0, 1], [1, 1], [0, 0]])
    got = metrics.label_map(query, query_labels, gallery, gallery_labels)
    assert got == pytest.approx((0.5 + 1.0) / 2)
    strict = metrics.label_map(query, query_labels, gallery, gallery_labels, match_normal=False)
    assert strict == pytest.approx(0.5)


def test_label_map_label_count_mismatch():
    with pytest.raises(ValueError, match="query_labels has 2 columns but gallery_labels has 3"):
        metrics.label_map(np.eye(2), np.eye(2), np.eye(2), np.ones((2, 3)))


# ---- zero-shot ------------------------------------------------------------------------------


def test_zero_shot_scores_hand_computed():
    image = np.array([[3.0, 0.0], [0.0, 2.0]])  # Unnormalised on purpose.
    positive = np.array([[1.0, 0.0], [1.0, 1.0]])
    negative = np.array([[0.0, 1.0], [-1.0, 1.0]])
    got = metrics.zero_shot_scores(image, positive, negative, logit_scale=2.0)
    s = 1 / np.sqrt(2)
    cos_pos = np.array([[1.0, s], [0.0, s]])
    cos_neg = np.array([[0.0, -s], [1.0, s]])
    e_pos, e_neg = np.exp(2.0 * cos_pos), np.exp(2.0 * cos_neg)
    np.testing.assert_allclose(got, e_pos / (e_pos + e_neg), rtol=1e-12)
    with pytest.raises(ValueError, match="negative_prompt_emb"):
        metrics.zero_shot_scores(image, positive, negative[:1])


# ---- slice hit rate, accuracy ---------------------------------------------------------------


def test_slice_hit_rate_hand_computed():
    lesion = np.zeros((3, 8), bool)
    lesion[0, 2:4] = True  # 2 / 8 lesion slices.
    lesion[1, 0:4] = True  # 4 / 8.
    selected = np.array([[2, 5], [0, 1], [6, 7]])  # Volume 2 has no lesion and is ignored.
    hit, expected = metrics.slice_hit_rate(selected, lesion)
    assert hit == pytest.approx((0.5 + 1.0) / 2)
    assert expected == pytest.approx((2 / 8 + 4 / 8) / 2)
    assert all(np.isnan(metrics.slice_hit_rate(selected, np.zeros((3, 8), bool))))


def test_slice_hit_rate_random_expectation_monte_carlo():
    rng = np.random.default_rng(0)
    lesion = rng.random((20, 32)) < rng.random((20, 1)) * 0.5
    lesion[0] = False
    _, expected = metrics.slice_hit_rate(np.zeros((20, 1), np.int64), lesion)
    trials = [
        metrics.slice_hit_rate(np.stack([rng.permutation(32)[:4] for _ in range(20)]), lesion)[0]
        for _ in range(400)
    ]
    assert np.mean(trials) == pytest.approx(expected, abs=0.01)


def test_slice_hit_rate_rejects_bad_indices():
    lesion = np.ones((1, 4), bool)
    with pytest.raises(ValueError, match="distinct"):
        metrics.slice_hit_rate(np.array([[1, 1]]), lesion)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        metrics.slice_hit_rate(np.array([[1, 4]]), lesion)


def test_accuracy_and_multiclass_auroc():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    labels = np.array([0, 2, 1, 1])
    assert metrics.accuracy(labels, logits) == 0.75  # Row 2 ties; argmax picks class 0.
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert metrics.multiclass_auroc(labels, probs) == pytest.approx(expected)
    with pytest.raises(ValueError, match="labels must lie in"):
        metrics.accuracy(np.array([0, 3, 1, 1]), logits)
