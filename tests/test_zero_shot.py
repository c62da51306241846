"""Zero-shot and retrieval benchmarks (configs/zero_shot.py, evaluation/zero_shot.py): prompt
files, the metric code against scikit-learn and brute force, and each protocol on a fixture laid
out like the real release, run on a tiny trained model."""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from configs import zero_shot as zero_shot_config
from data_pipelines import sources, synthetic_phantoms, transforms
from data_pipelines.builders import chexpert, common, ct_rate, mimic_cxr_jpg, rad_chestct
from data_pipelines.prepare import ensure_prepared
from tests import test_visualize
from tests.test_builders_downstream import (  # noqa: F401 (rsna_root: a fixture)
    CHEXPERT_HEADER,
    RSNA_SIZE,
    _xray,
    rsna_root,
)
from tests.test_builders_real import (
    CT_IMPRESSION,
    CT_RATE_AFFINE,
    CT_SHAPE,
    _ct,
    _ct_rate_volume_path,
    _jpeg,
    _nifti,
    _write_csv,
)
from unimedi_jax import inference
from unimedi_jax.evaluation import (
    evaluators,
    paper_tables,
    published,
    tasks,
    zero_shot,
    zero_shot_metrics,
    zero_shot_prompts,
)
from unimedi_jax.evaluation.downstream import DownstreamError

ROOT = Path(__file__).resolve().parents[1]
run = test_visualize.run  # the tiny trained run (a module-scoped fixture), reused

# ------------------------------------------------------------------------------ prompt files


def test_ct_rate_prompts_are_ct_clips():
    prompts = zero_shot_prompts.load_prompts(zero_shot_prompts.prompts_path("ct_rate"))
    assert list(prompts.pairs) == list(ct_rate.ABNORMALITIES)
    assert prompts.pairs["Lung nodule"] == ("Lung nodule.", "not Lung nodule.")
    assert all(p == (f"{n}.", f"not {n}.") for n, p in prompts.pairs.items())


def test_phantom_prompts_kept_their_wording():
    prompts = zero_shot_prompts.load_prompts(zero_shot_prompts.prompts_path("phantoms"))
    assert prompts.pairs == {
        "pleural_effusion_left": ("Left pleural effusion.", "No pleural effusion."),
        "pleural_effusion_right": ("Right pleural effusion.", "No pleural effusion."),
        "nodule": ("Pulmonary nodule.", "No pulmonary nodule."),
        "consolidation": ("There is consolidation.", "No focal consolidation."),
        "ground_glass_opacity": ("Ground-glass opacity.", "No ground-glass opacity."),
        "cardiomegaly": ("Cardiomegaly is present.", "The heart is normal in size."),
    }
    assert zero_shot_prompts.label_names("phantoms") == synthetic_phantoms.FINDINGS


@pytest.mark.parametrize("benchmark", zero_shot_config.DATASETS)
def test_every_benchmark_ships_prompts_for_its_labels(benchmark):
    prompts = zero_shot_prompts.load_prompts(zero_shot_prompts.prompts_path(benchmark))
    names = list(prompts.pairs) + list(prompts.classes)
    labels = zero_shot_prompts.label_names(zero_shot_config.BENCHMARKS[benchmark][0])
    assert zero_shot_prompts.label_columns(names, labels, prompts.path) == [
        labels.index(n) for n in names
    ]
    if prompts.cross_modal is not None:  # the other modality's wording, of shared labels
        cross = list(prompts.cross_modal.pairs) + list(prompts.cross_modal.classes)
        assert cross and set(cross) <= set(names)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist: pass --config.prompts=FILE.json"),
        ("{not json", "is not valid JSON"),
        ('{"pairs": {"Cardiomegaly": ["only one"]}}', 'is not a JSON object with "pairs"'),
        ('{"classes": {"pneumonia": []}}', "non-empty prompts"),
        ("{}", 'is not a JSON object with "pairs"'),
        ('{"pairs": {"a": ["b", "c"]}, "cross_modal": []}', '"cross_modal" must be an object'),
    ],
)
def test_bad_prompt_files_are_named(tmp_path, content, message):
    path = tmp_path / "mine.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(zero_shot_prompts.PromptError, match=message) as err:
        zero_shot_prompts.load_prompts(path)
    assert str(path) in str(err.value)


def test_prompts_for_unknown_labels_are_named(tmp_path):
    with pytest.raises(
        zero_shot_prompts.PromptError, match=r"names \['Pneumothorax'\].*Cardiomegaly"
    ):
        zero_shot_prompts.label_columns(
            ["Pneumothorax"], ct_rate.ABNORMALITIES, tmp_path / "p.json"
        )


def test_config_names_the_benchmarks():
    config = zero_shot_config.get_config("dataset=ct_rate")
    assert (config.kind, config.protocol, config.split) == ("zero_shot", "ct_clip_18", "test")
    assert config.bootstrap.to_dict() == {"samples": 1000, "seed": 0}
    assert zero_shot_config.get_config("dataset=mimic_5x200").dataset == "mimic_cxr_jpg"
    with pytest.raises(tasks.ProtocolError, match="no zero-shot protocol; valid: ct_rate") as err:
        zero_shot_config.get_config("dataset=covidx")
    assert zero_shot_config.FILE in str(err.value)


# ------------------------------------------------------------------------------------ metrics


def _ct_clip_find_threshold(probabilities, labels):
    """CT-CLIP's bootstrap_values.find_threshold, as its loop does it, on sklearn's matrix."""
    best, best_distance = 0.0, 10000.0
    for threshold in np.linspace(0, 1, 100):
        c = confusion_matrix(labels, (probabilities > threshold).astype(int), labels=[0, 1])
        tpr = c[1, 1] / (c[1, 1] + c[1, 0])
        fpr = c[0, 1] / (c[0, 1] + c[0, 0])
        distance = math.sqrt((1 - tpr) ** 2 + fpr**2)
        if distance <= best_distance:
            best, best_distance = threshold, distance
    return best


@pytest.mark.parametrize("seed", range(4))
def test_threshold_and_its_figures_match_ct_clip_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.3
    scores = np.clip(0.5 * labels + rng.normal(0.3, 0.25, 60), 0, 1)
    if seed == 3:
        scores = np.round(scores, 1)  # ties on the grid
    threshold = zero_shot_metrics.ct_clip_threshold(labels, scores)
    assert threshold == pytest.approx(_ct_clip_find_threshold(scores, labels.astype(int)))
    predicted = scores > threshold
    got = zero_shot_metrics.threshold_metrics(labels, predicted)
    assert got["f1"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    assert got["f1_positive"] == pytest.approx(f1_score(labels, predicted))
    assert got["precision"] == pytest.approx(precision_score(labels, predicted, zero_division=0))
    assert got["recall"] == pytest.approx(recall_score(labels, predicted))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted))


def test_threshold_figures_when_nothing_is_predicted_positive():
    labels, predicted = np.array([1, 0, 0, 1]), np.zeros(4, bool)
    got = zero_shot_metrics.threshold_metrics(labels, predicted)
    assert got["precision"] == precision_score(labels, predicted, zero_division=0) == 0.0
    assert got["f1"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    assert math.isnan(zero_shot_metrics.ct_clip_threshold(np.ones(4), np.arange(4) / 4))


def test_bootstrap_intervals_by_brute_force():
    rng = np.random.default_rng(7)
    n, samples, seed = 25, 1000, 3
    labels = rng.random((n, 2)) < 0.5
    scores = rng.random((n, 2)) + 0.4 * labels
    report = zero_shot_metrics.multilabel_report(labels, scores, ["a", "b"], samples, seed)

    per_class, means = [], []
    for rows in np.random.default_rng(seed).integers(0, n, size=(samples, n)):
        found = [
            roc_auc_score(labels[rows, c], scores[rows, c])
            if 0 < labels[rows, c].sum() < n
            else np.nan
            for c in range(2)
        ]
        per_class.append(found)
        means.append(np.nanmean(found) if not np.isnan(found).all() else np.nan)

    def cis(values):  # CT-CLIP's compute_cis: sorted values at int(0.025 m) - 1, ...
        values = sorted(v for v in values if not np.isnan(v))
        m = len(values)
        return values[max(int(0.025 * m) - 1, 0)], values[int(0.975 * m) - 1]

    per_class = np.array(per_class)
    for c, name in enumerate("ab"):
        assert report["classes"][name]["auroc"] == pytest.approx(
            roc_auc_score(labels[:, c], scores[:, c])
        )
        assert report["classes"][name]["auroc_ci"] == pytest.approx(cis(per_class[:, c]))
    assert report["mean_auroc_ci"] == pytest.approx(cis(means))
    assert report["mean_auroc"] == pytest.approx(
        np.mean([roc_auc_score(labels[:, c], scores[:, c]) for c in range(2)])
    )
    # With exactly 1,000 defined resamples the interval is CT-CLIP's 25th and 975th values.
    if not np.isnan(per_class[:, 0]).any():
        ordered = np.sort(per_class[:, 0])
        assert report["classes"]["a"]["auroc_ci"] == pytest.approx((ordered[24], ordered[974]))


def _masked_auroc(labels, scores):
    """scikit-learn's AUROC on the records whose label is 0 or 1."""
    known = np.isin(labels, (0, 1))
    return roc_auc_score(labels[known], scores[known])


def _chexpert_style_labels(rng, n, c):
    """Labels as CheXpert and MIMIC state them: 1, 0, -1 (uncertain) and blank (NaN)."""
    return rng.choice([0.0, 1.0, -1.0, np.nan], size=(n, c), p=[0.45, 0.25, 0.15, 0.15])


def test_multilabel_report_leaves_out_uncertain_and_blank_labels_per_label():
    rng = np.random.default_rng(5)
    labels, scores = _chexpert_style_labels(rng, 60, 3), rng.random((60, 3))
    found = zero_shot_metrics.multilabel_report(labels, scores, ["a", "b", "c"], samples=20, seed=0)
    for c, name in enumerate("abc"):
        known = np.isin(labels[:, c], (0, 1))
        assert found["classes"][name]["auroc"] == pytest.approx(
            _masked_auroc(labels[:, c], scores[:, c])
        )
        assert found["classes"][name]["records"] == known.sum()
        assert found["classes"][name]["positives"] == (labels[:, c] == 1).sum()
        threshold = found["classes"][name]["threshold"]
        predicted = scores[known, c] > threshold
        assert found["classes"][name]["f1"] == pytest.approx(
            f1_score(labels[known, c], predicted, average="weighted")
        )
    assert found["mean_auroc"] == pytest.approx(
        np.mean([_masked_auroc(labels[:, c], scores[:, c]) for c in range(3)])
    )


def test_in_loop_zero_shot_scores_each_finding_on_the_records_that_state_it():
    """The training loop's zero_shot evaluator on CT-RATE-labelled volumes with uncertain and
    blank labels (a volume without labels, MIMIC-style cells): AUROC per finding on the records
    whose label is 0/1, against scikit-learn on brute-force prompt scores."""
    names = list(zero_shot_prompts.load_prompts(zero_shot_prompts.prompts_path("ct_rate")).pairs)
    rng = np.random.default_rng(7)
    n, dim = 40, 6
    image_emb = rng.normal(size=(n, dim))
    labels = _chexpert_style_labels(rng, n, len(ct_rate.ABNORMALITIES))
    labels[3] = np.nan  # a volume without labels
    text_vectors: dict[str, np.ndarray] = {}

    class Model:
        def embed_texts(self, texts):
            return np.stack([text_vectors.setdefault(t, rng.normal(size=dim)) for t in texts])

    empty = np.zeros((n, 0))
    modality = evaluators.Modality(empty, labels, [], image_emb, empty, None)
    data = evaluators.EvalSet("ct_rate", {"volume": modality}, {"volume": "ct_rate"}, None, n)
    found = evaluators.zero_shot(Model(), data)

    prompts = zero_shot_prompts.load_prompts(zero_shot_prompts.prompts_path("ct_rate")).pairs
    unit = lambda v: v / np.linalg.norm(v)
    expected = []
    for name in names:
        c = list(ct_rate.ABNORMALITIES).index(name)
        positive, negative = (unit(text_vectors[t]) for t in prompts[name])
        margin = np.array([unit(e) @ positive - unit(e) @ negative for e in image_emb])
        expected.append(_masked_auroc(labels[:, c], 1 / (1 + np.exp(-margin))))
        assert found[f"zero_shot_volume/auroc/{name}"] == pytest.approx(expected[-1])
    assert found["zero_shot_volume/mean_auroc"] == pytest.approx(np.mean(expected))


def _cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _top_k(similarities, k):
    """The indices of the k highest, as a stable descending sort ranks them (ties: lower index
    first): how CT-CLIP's scripts pick their top K."""
    return [j for j, _ in sorted(enumerate(similarities), key=lambda x: x[1], reverse=True)[:k]]


def _brute_report_to_volume(reports, volumes, k):
    """CT-CLIP's count, loop by loop: the share of reports whose own volume is in their top k."""
    hits = [i in _top_k([_cosine(t, v) for v in volumes], k) for i, t in enumerate(reports)]
    return sum(hits) / len(reports)


def _brute_volume_to_volume(volumes, labels, ks):
    """CT-CLIP's volume_to_volume loop: gallery = volumes with a positive label; per query the
    mean label overlap (both 1 / either 1) of its top K; one list of query means kept across
    the K values, as the script does (its printed figures)."""
    gallery = [j for j in range(len(volumes)) if labels[j].sum() != 0]
    per_k, printed, kept = [], [], []
    for k in ks:
        means = []
        for i in range(len(volumes)):
            top = _top_k([_cosine(volumes[i], volumes[j]) for j in gallery], k)
            ratios = []
            for t in top:
                a, b = labels[i], labels[gallery[t]]
                both = sum(1 for x, y in zip(a, b, strict=True) if x == 1 and y == 1)
                one = sum(1 for x, y in zip(a, b, strict=True) if x != y)
                ratios.append(both / (both + one))
            means.append(np.mean(ratios))
        kept += means
        per_k.append(np.mean(means))
        printed.append(np.mean(kept))
    return per_k, printed


@pytest.mark.parametrize("seed", range(3))
def test_ct_clip_report_to_volume_recall_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 30
    volumes, reports = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    reports[:10] += 2 * volumes[:10]  # some reports near their volume
    volumes[20:25] = volumes[20]  # tied volumes: the lower index ranks first
    reports[26] = reports[27]  # a copied report: only its own volume counts
    found = zero_shot_metrics.ct_clip_report_to_volume(reports, volumes, (1, 5, 10, 30, 31))
    for k in (1, 5, 10, 30):
        expected = _brute_report_to_volume(reports, volumes, k)
        assert found[f"report_to_volume/R@{k}"] == pytest.approx(expected)
        assert found[f"report_to_volume/chance/R@{k}"] == pytest.approx(k / n)
    assert found["report_to_volume/R@30"] == 1.0
    assert math.isnan(found["report_to_volume/R@31"])  # CT-CLIP's script refuses K > N


@pytest.mark.parametrize("seed", range(3))
def test_ct_clip_volume_to_volume_map_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, ks = 24, (1, 5, 10, 50)
    labels = (rng.random((n, 6)) < 0.3).astype(float)
    labels[:3] = 0  # queries without a positive: in no gallery, scoring 0
    volumes = rng.normal(size=(n, 5)) + labels @ rng.normal(size=(6, 5))
    volumes[10:13] = volumes[10]  # ties
    found = zero_shot_metrics.ct_clip_volume_to_volume(volumes, labels, ks)
    per_k, printed = _brute_volume_to_volume(volumes, labels, ks)
    for k, expected, shown in zip(ks, per_k, printed, strict=True):
        assert found[f"volume_to_volume/MAP@{k}"] == pytest.approx(expected)
        assert found[f"volume_to_volume_as_printed/MAP@{k}"] == pytest.approx(shown)
    # A volume whose labels are unknown takes no part, as query or as gallery item.
    unknown = np.vstack([labels, np.full((1, 6), np.nan)])
    again = zero_shot_metrics.ct_clip_volume_to_volume(
        np.vstack([volumes, volumes[5]]), unknown, ks
    )
    assert again == pytest.approx(found)


def test_class_scores_are_glorias():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(9, 4))
    prompts = [rng.normal(size=(3, 4)), rng.normal(size=(5, 4))]
    got = zero_shot_metrics.class_scores(images, prompts)
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    best = np.array([[max(cos(i, p) for p in ps) for ps in prompts] for i in images])
    expected = (best - best.mean(0)) / best.std(0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------- protocols

# Eight validation volumes: labels vary per abnormality so every AUROC is defined; the last has
# no labels row (counted as unlabelled, kept for retrieval).
CT_VALID = [f"valid_{p}_a_1" for p in range(1, 9)]
CT_LABELS = {name: [(i >> (c % 3)) & 1 for c in range(18)] for i, name in enumerate(CT_VALID)}
CT_UNLABELLED = "valid_8_a_1"


def _ct_report(name: str) -> str:
    return f"Case {name}. Trachea and both main bronchi are open. Heart size is normal."


@pytest.fixture(scope="module")
def ct_rate_dir(tmp_path_factory, run):
    """CT-RATE laid out as released (as tests/test_builders_real.py builds it), prepared at the
    tiny run's volume size; returns (release root, data_dir)."""
    root = tmp_path_factory.mktemp("CT-RATE-zero-shot")
    names = {"train": ["train_1_a_1", "train_2_a_1"], "valid": CT_VALID}
    for seed, name in enumerate(names["train"] + names["valid"]):
        _nifti(_ct_rate_volume_path(root, name), _ct(seed, CT_SHAPE) + 1024, CT_RATE_AFFINE)
    for part, reports, metadata, labels in (
        ("train", "train_reports", "train_metadata", "train_predicted_labels"),
        ("valid", "validation_reports", "validation_metadata", "valid_predicted_labels"),
    ):
        _write_csv(
            root / "radiology_text_reports" / f"{reports}.csv",
            ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
             "Impressions_EN"],
            [[f"{n}.nii.gz", "Cough.", "CT.", _ct_report(n), CT_IMPRESSION] for n in names[part]],
        )  # fmt: skip
        _write_csv(
            root / "metadata" / f"{metadata}.csv",
            ["VolumeName", "RescaleSlope", "RescaleIntercept"],
            [[f"{n}.nii.gz", 1, -1024] for n in names[part]],
        )
        _write_csv(
            root / "multi_abnormality_labels" / f"{labels}.csv",
            ["VolumeName", *ct_rate.ABNORMALITIES],
            [
                [f"{n}.nii.gz", *CT_LABELS.get(n, [0] * 18)]
                for n in names[part]
                if n != CT_UNLABELLED
            ],
        )
    data_dir = tmp_path_factory.mktemp("ct-rate-data")
    shape = tuple(inference.load_config(run).model.volume_size)
    ensure_prepared("ct_rate", data_dir, manual_dir=str(root), volume_shape=shape, num_workers=0)
    return root, data_dir


def _cli(*args):
    cmd = [sys.executable, "-m", "unimedi_jax.evaluate", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ct_rate_command_writes_ct_clips_figures(run, ct_rate_dir, tmp_path):
    _, ct_rate_dir = ct_rate_dir
    proc = _cli(
        "--config=configs/zero_shot.py:dataset=ct_rate",
        f"--config.data.data_dir={ct_rate_dir}",
        "--config.bootstrap.samples=50",
        f"--workdir={run}",
        f"--out={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert (results["kind"], results["protocol"], results["split"]) == (
        "zero_shot",
        "ct_clip_18",
        "test",
    )
    assert (results["records"], results["records_unlabelled"]) == (8, 1)

    # The same figures from an independent computation: the prepared records, eval-transformed,
    # embedded through the inference API; CT-CLIP's pairwise softmax; scikit-learn's AUROC.
    model = inference.load(run)
    window = tuple(inference.load_config(run).data.hu_window)  # the config's default: the run's
    records = list(sources.open_source("ct_rate", ct_rate_dir, "3d", "test").open())
    volumes = np.stack([transforms.transform_3d(r["volume"], window) for r in records])
    reports = [r["report"].decode() for r in records]
    labels = np.stack([r["labels"] for r in records])
    keep = ~np.isnan(labels).any(1)
    emb = model.embed_volumes(volumes)
    names = list(ct_rate.ABNORMALITIES)
    text = model.embed_texts([f"{n}." for n in names] + [f"not {n}." for n in names])
    scale = results["logit_scale"]
    logits = scale * emb[keep] @ text.T
    pos, neg = logits[:, :18], logits[:, 18:]
    probability = np.exp(pos) / (np.exp(pos) + np.exp(neg))
    found = results["zero_shot"]
    for c, name in enumerate(names):
        expected = roc_auc_score(labels[keep, c], probability[:, c])
        assert found["classes"][name]["auroc"] == pytest.approx(expected, abs=1e-5)
        low, high = found["classes"][name]["auroc_ci"]
        assert 0.0 <= low <= high <= 1.0
    assert 0.0 < scale <= 100.0
    # CT scored with the X-ray wording of the shared labels (the file's cross_modal pairs).
    cross = zero_shot_prompts.load_prompts(
        zero_shot_prompts.prompts_path("ct_rate")
    ).cross_modal.pairs
    c = names.index("Pleural effusion")
    xray = model.embed_texts(list(cross["Pleural effusion"]))
    margin = scale * (emb[keep] @ xray[0] - emb[keep] @ xray[1])
    expected = roc_auc_score(labels[keep, c], 1 / (1 + np.exp(-margin)))
    found_cross = results["zero_shot_cross_modal"]
    assert set(found_cross["classes"]) == set(cross)
    assert found_cross["classes"]["Pleural effusion"]["auroc"] == pytest.approx(expected, abs=1e-5)
    own = [found["classes"][n]["auroc"] for n in cross]
    assert found_cross["own_prompts_mean_auroc"] == pytest.approx(np.mean(own))
    # CT-CLIP's own retrieval counts, loop by loop on the same embeddings.
    text = model.embed_texts(reports)
    ct_clip = results["ct_clip_retrieval"]
    assert ct_clip["report_to_volume/R@5"] == pytest.approx(_brute_report_to_volume(text, emb, 5))
    assert all(math.isnan(ct_clip[f"report_to_volume/R@{k}"]) for k in (10, 50, 100))  # 8 < K
    per_k, _ = _brute_volume_to_volume(emb[keep], labels[keep], (1, 5, 10, 50))
    assert [ct_clip[f"volume_to_volume/MAP@{k}"] for k in (1, 5, 10, 50)] == pytest.approx(per_k)
    r1 = np.mean(np.argmax(emb @ model.embed_texts(reports).T, 1) == np.arange(len(records)))
    assert results["retrieval"]["volume_to_report/R@1"] == pytest.approx(r1)
    assert results["retrieval"]["volume_to_report/R@50"] == 1.0
    assert set(results["retrieval"]) >= {f"report_to_volume/R@{k}" for k in (1, 5, 10, 50)}

    # The results table puts this eval.json under the published rows of the protocol.
    rows = published.load_published(published.published_path("ct_rate")).rows("zero_shot")
    lines = paper_tables.tables_of([tmp_path]).split("### CT-RATE zero-shot")[1].splitlines()
    assert lines[4].startswith("| CT-CLIP (zero-shot) | 73.1 | 70.7 | 66.8 | 32.3 | as reported")
    low, high = (f"{100 * v:.1f}" for v in found["mean_auroc_ci"])
    ours = [f"{100 * found[k]:.1f}" for k in ("mean_auroc", "mean_f1", "mean_accuracy")]
    ours.append(f"{100 * found['mean_precision']:.1f}")
    assert lines[4 + len(rows)] == (
        f"| {Path(run).name} @{results['step']} | " + " | ".join(ours)
        + f" | prompts ct_rate.json; AUROC 95% CI {low}-{high} |"
    )  # fmt: skip


def test_data_of_other_sizes_stops_with_the_probes_fix(run, ct_rate_dir, tmp_path):
    root, _ = ct_rate_dir
    ensure_prepared("ct_rate", tmp_path, manual_dir=str(root), volume_shape=(4, 16, 16))
    config = zero_shot_config.get_config("dataset=ct_rate")
    config.data.data_dir = str(tmp_path)
    with pytest.raises(DownstreamError, match=r"stores volumes of .*--volume_shape=8,32,32"):
        zero_shot.evaluate(config, run)
    config.data.data_dir = str(tmp_path / "none")
    with pytest.raises(DownstreamError, match="ct_rate/ct is not prepared in"):
        zero_shot.evaluate(config, run)


@pytest.fixture(scope="module")
def rsna_dir(tmp_path_factory, rsna_root):  # noqa: F811 (the fixture imported above)
    data_dir = tmp_path_factory.mktemp("rsna-data")
    ensure_prepared(
        "rsna_pneumonia", data_dir, manual_dir=str(rsna_root), image_size=RSNA_SIZE, num_workers=0
    )
    return data_dir


def test_rsna_zero_shot_on_the_probe_split(run, rsna_dir):
    config = zero_shot_config.get_config("dataset=rsna_pneumonia")
    config.data.data_dir = str(rsna_dir)
    config.split = "train"  # the fixture's test split holds one or two images
    results = zero_shot.evaluate(config, run)

    model = inference.load(run)
    records = list(sources.open_source("rsna_pneumonia", rsna_dir, "2d", "train").open())
    images = np.stack([transforms.eval_transform_2d(r["image"], 32) for r in records])
    labels = np.array([int(r["label"]) for r in records])
    prompts = zero_shot_prompts.load_prompts(
        zero_shot_prompts.prompts_path("rsna_pneumonia")
    ).classes
    emb = model.embed_images(images)
    classes = [model.embed_texts(list(prompts[c])) for c in ("no pneumonia", "pneumonia")]
    scores = zero_shot_metrics.class_scores(emb, classes)
    predicted = scores.argmax(1)
    found = results["zero_shot"]
    assert results["records"] == len(records) and results["protocol"] == "rsna_zero_shot"
    assert found["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert found["f1"] == pytest.approx(f1_score(labels, predicted, zero_division=0))
    assert found["auroc"] == pytest.approx(roc_auc_score(labels, scores[:, 1] - scores[:, 0]))


# ------------------------------------------------------------------------------ RAD-ChestCT

RAD_ACCESSIONS = [f"trn{i:05d}" for i in range(1, 9)]
RAD_MISSING = "trn00009"  # listed in the table, no .npz: skipped as a missing volume
RAD_LOCATIONS = ("left_lung", "right_lung")
RAD_SHAPE = (16, 64, 64)  # [slice, row, column], as the release stores its volumes


def _rad_cells(i: int) -> dict[str, str]:
    """Volume i's row of the release's label table: each shared abnormality positive in one of
    two locations (varying per volume, so every AUROC is defined), plus an unshared one."""
    row = {}
    for c, tokens in enumerate(rad_chestct.SHARED.values()):
        positive = (i >> (c % 3)) & 1
        for t, token in enumerate(tokens):
            for where, location in enumerate(RAD_LOCATIONS):
                hit = positive and where == (i + c) % 2 and t == i % len(tokens)
                row[f"{token}*{location}"] = "1" if hit else "0"
    row["pneumonia*left_lung"] = "1"
    return row


def _rad_expected(i: int) -> list[float]:
    return [float((i >> (c % 3)) & 1) for c in range(len(rad_chestct.SHARED))]


@pytest.fixture(scope="module")
def rad_chestct_dir(tmp_path_factory, run):
    """RAD-ChestCT laid out as released: the label table with NoteAcc_DEID and
    <abnormality>*<location> columns, <NoteAcc_DEID>.npz volumes (array 'ct', HU, [slice, row,
    column] from the head down; one a folder below); prepared at the tiny run's volume size.
    Returns (release root, data_dir)."""
    root = tmp_path_factory.mktemp("RAD-ChestCT")
    rows = []
    for i, accession in enumerate([*RAD_ACCESSIONS, RAD_MISSING]):
        rows.append({"NoteAcc_DEID": accession, **_rad_cells(i)})
        if accession == RAD_MISSING:
            continue
        ct = _ct(i, RAD_SHAPE) // 4 - 500
        ct[0] = 900  # the head's slice, marked
        folder = root / "volumes" if i == 0 else root
        folder.mkdir(exist_ok=True)
        np.savez_compressed(folder / f"{accession}.npz", ct=ct)
    _write_csv(root / rad_chestct.LABEL_TABLES[0], list(rows[0]), [list(r.values()) for r in rows])
    data_dir = tmp_path_factory.mktemp("rad-chestct-data")
    shape = tuple(inference.load_config(run).model.volume_size)
    ensure_prepared(
        "rad_chestct", data_dir, manual_dir=str(root), volume_shape=shape, num_workers=0
    )
    return root, data_dir


def test_rad_chestct_builder_reads_the_release_layout(rad_chestct_dir):
    _, data_dir = rad_chestct_dir
    records = list(sources.open_source("rad_chestct", data_dir, "3d", "test").open())
    assert [r["id"].decode() for r in records] == RAD_ACCESSIONS
    for i, record in enumerate(records):
        np.testing.assert_array_equal(record["labels"], _rad_expected(i))
        # Canonical order runs feet to head: the release's first (head) slice comes last.
        assert record["volume"][-1].mean() > record["volume"][0].mean() + 300
    meta = json.loads(next(data_dir.rglob("metadata.json")).read_text())
    assert meta["skipped"]["test"] == {"missing volume": 1}
    assert meta["labels"] == list(rad_chestct.ABNORMALITIES)


def test_rad_chestct_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(common.LayoutError, match=r"imgtrain_Abnormality_and_Location_Labels\.csv"):
        rad_chestct.check_manual_dir(tmp_path)
    with pytest.raises(common.LayoutError, match="column of cardiomegaly"):
        rad_chestct.shared_labels({"NoteAcc_DEID": "x"}, ["NoteAcc_DEID"], tmp_path / "t.csv")


@pytest.fixture(scope="module")
def evaluated(run, ct_rate_dir, rad_chestct_dir, tmp_path_factory):
    """The tiny run evaluated in-process on the CT-RATE and RAD-ChestCT fixtures, each
    eval.json in a folder of its benchmark: (the folder above them, benchmark -> results)."""
    out = tmp_path_factory.mktemp("evaluated")
    found = {}
    for benchmark, (_, data_dir) in (("ct_rate", ct_rate_dir), ("rad_chestct", rad_chestct_dir)):
        config = zero_shot_config.get_config(f"dataset={benchmark}")
        config.data.data_dir = str(data_dir)
        config.bootstrap.samples = 50
        found[benchmark] = zero_shot.evaluate(config, run)
        (out / benchmark).mkdir()
        (out / benchmark / "eval.json").write_text(json.dumps(found[benchmark]))
    return out, found


def test_rad_chestct_is_scored_as_ct_rate(run, rad_chestct_dir, evaluated):
    _, data_dir = rad_chestct_dir
    folder, found_all = evaluated
    results = found_all["rad_chestct"]
    assert (results["protocol"], results["split"], results["records"]) == ("ct_clip_18", "test", 8)
    assert Path(results["prompts"]).name == "rad_chestct.json"

    # CT-CLIP's pairwise softmax, scikit-learn's AUROC and CT-CLIP's threshold, computed anew.
    model = inference.load(run)
    window = tuple(inference.load_config(run).data.hu_window)
    records = list(sources.open_source("rad_chestct", data_dir, "3d", "test").open())
    emb = model.embed_volumes(
        np.stack([transforms.transform_3d(r["volume"], window) for r in records])
    )
    labels = np.stack([r["labels"] for r in records]).astype(int)
    names = list(rad_chestct.ABNORMALITIES)
    text = model.embed_texts([f"{n}." for n in names] + [f"not {n}." for n in names])
    logits = results["logit_scale"] * emb @ text.T
    pos, neg = logits[:, : len(names)], logits[:, len(names) :]
    probability = np.exp(pos) / (np.exp(pos) + np.exp(neg))
    found = results["zero_shot"]
    f1s = []
    for c, name in enumerate(names):
        expected = roc_auc_score(labels[:, c], probability[:, c])
        assert found["classes"][name]["auroc"] == pytest.approx(expected, abs=1e-5)
        threshold = _ct_clip_find_threshold(probability[:, c], labels[:, c])
        f1s.append(f1_score(labels[:, c], probability[:, c] > threshold, average="weighted"))
        low, high = found["classes"][name]["auroc_ci"]
        assert 0.0 <= low <= high <= 1.0
    assert found["mean_f1"] == pytest.approx(np.mean(f1s), abs=1e-4)
    assert "retrieval" not in results  # the release holds no reports

    lines = paper_tables.tables_of([folder / "rad_chestct"]).split("### RAD-ChestCT zero-shot")
    lines = lines[1].splitlines()
    assert lines[4] == (
        "| CT-CLIP (zero-shot) | 62.9 | 63.7 | 59.2 | - | as reported in EXACT-S4 (secondary) |"
    )
    assert lines[8].startswith(f"| {Path(run).name} @{results['step']} | ")
    assert any("External Validation — RAD-ChestCT Dataset (n = 3,630)" in line for line in lines)


def test_results_table_on_a_run_evaluated_on_both_benchmarks(run, evaluated, tmp_path):
    folder, found = evaluated
    plot = tmp_path / "ct_rate.png"
    cmd = [sys.executable, "-m", "unimedi_jax.results_table", str(folder), f"--plot={plot}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    ours = f"| {Path(run).name} @{found['ct_rate']['step']} | "
    for title, first in (
        (
            "CT-RATE zero-shot, 18 abnormalities",
            "| CT-CLIP (zero-shot) | 73.1 | 70.7 | 66.8 | 32.3",
        ),
        ("CT-RATE report-to-volume retrieval", "| CT-CLIP (zero-shot) | 2.9 | 5.0 | 18.0 | 28.7"),
        ("CT-RATE volume-to-volume retrieval", ours),
        ("RAD-ChestCT zero-shot", "| CT-CLIP (zero-shot) | 62.9 | 63.7 | 59.2 | -"),
    ):
        block = out.split(f"### {title}")[1].split("###")[0]
        assert first in block and ours in block
    assert "line read: `While the paper says that the recall@5, 10, 50, 100" in out
    assert out.rstrip().endswith(f"wrote {plot}")
    with Image.open(plot) as png:
        points = json.loads(png.text["Description"])
    assert points[-1]["auroc"] == pytest.approx(found["ct_rate"]["zero_shot"]["mean_auroc"])


def _docs_line(pattern: str) -> list[str]:
    """The one command line of docs/downstream.md matching ``pattern``, as its arguments."""
    found = re.findall(pattern, (ROOT / "docs" / "downstream.md").read_text(), re.M)
    assert len(found) == 1, found
    return shlex.split(found[0])


def test_the_docs_rad_chestct_and_results_table_lines_run(
    run, rad_chestct_dir, evaluated, tmp_path
):
    """docs/downstream.md's RAD-ChestCT lines and results_table line, run as written from a
    fresh folder, then pointed at the fixture and the tiny run (later flags win)."""
    root, _ = rad_chestct_dir
    shape = ",".join(map(str, inference.load_config(run).model.volume_size))
    prepare = _docs_line(r"^python -m data_pipelines\.prepare rad_chestct .*$")
    evaluate = _docs_line(r"^python -m unimedi_jax\.evaluate .*dataset=rad_chestct .*$")
    table = _docs_line(r"^python -m unimedi_jax\.results_table results .*$")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (
        [*prepare, f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}",
         f"--volume_shape={shape}", "--num_workers=0"],
        [*evaluate, f"--workdir={run}", f"--config.data.data_dir={tmp_path / 'tfds'}",
         "--config.bootstrap.samples=20"],
    ):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((tmp_path / "results" / "rad_chestct" / "eval.json").read_text())
    expected = evaluated[1]["rad_chestct"]["zero_shot"]["mean_auroc"]
    assert written["zero_shot"]["mean_auroc"] == pytest.approx(expected, abs=1e-5)
    (tmp_path / "results" / "ct_rate").mkdir()
    (tmp_path / "results" / "ct_rate" / "eval.json").write_text(json.dumps(evaluated[1]["ct_rate"]))
    proc = subprocess.run(
        [sys.executable, *table[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### RAD-ChestCT zero-shot" in proc.stdout
    assert proc.stdout.rstrip().endswith("wrote results/ct_rate.png")
    with Image.open(tmp_path / "results" / "ct_rate.png") as png:
        assert png.format == "PNG" and "Description" in png.text


# ----------------------------------------------------------------------------------- 5x200


def test_glorias_template_prompts_are_every_combination():
    prompts = zero_shot_prompts.load_prompts(
        zero_shot_prompts.prompts_path("chexpert_5x200")
    ).classes
    assert list(prompts) == list(chexpert.CLASS_NAMES)
    # GLoRIA's CHEXPERT_CLASS_PROMPTS: 3 severities x 7 subtypes x 10 locations for Atelectasis;
    # Pleural Effusion's parts come severity, location, subtype (a subtype listed twice).
    assert len(prompts["Atelectasis"]) == 210 and len(prompts["Cardiomegaly"]) == 15
    assert "mild linear atelectasis at the lung bases" in prompts["Atelectasis"]
    assert "subsegmental atelectasis at the mid lung zone" in prompts["Atelectasis"]
    assert "small left bilateral pleural effusion" in prompts["Pleural Effusion"]
    assert len(prompts["Pleural Effusion"]) == 6 * 3 * 2
    assert zero_shot_prompts.expand(["own  prompt", "own prompt"]) == ("own prompt",)


def test_5x200_draw_is_seeded_and_exactly_one_positive():
    rng = np.random.default_rng(0)
    labels = rng.choice([0.0, 1.0, -1.0, np.nan], size=(400, 5), p=[0.5, 0.2, 0.2, 0.1])
    chosen = zero_shot.draw_5x200(labels, 6, seed=3, where="x")
    assert chosen.shape == (5, 6) and len(set(chosen.reshape(-1))) == 30
    for c in range(5):
        for row in chosen[c]:  # brute force: positive for c, for no other of the five
            assert labels[row, c] == 1 and sum(labels[row, k] == 1 for k in range(5)) == 1
    np.testing.assert_array_equal(chosen, zero_shot.draw_5x200(labels, 6, seed=3, where="x"))
    assert not np.array_equal(chosen, zero_shot.draw_5x200(labels, 6, seed=4, where="x"))
    with pytest.raises(
        zero_shot_prompts.PromptError, match=r"chexpert split 'test' has .*needs 500"
    ):
        zero_shot.draw_5x200(labels, 500, seed=3, where="chexpert split 'test'")


def _glorias_5x200_rows(rows: list[dict], five, others) -> dict[str, set[int]]:
    """GLoRIA's preprocess_chexpert_5x200_data filter, re-done row by row: blanks read as 0, a
    row is class ``name``'s when it equals that class's one-hot vector over ``five`` and
    ``others``."""
    found = {}
    for name in five:
        found[name] = {
            i
            for i, row in enumerate(rows)
            if all(
                (0.0 if math.isnan(row[column]) else row[column]) == float(column == name)
                for column in [*five, *others]
            )
        }
    return found


def test_5x200_draw_selects_as_gloria_does_on_real_label_conventions():
    columns = list(mimic_cxr_jpg.CHEXPERT_LABELS)
    others = [n for n in columns if n not in FIVE and n != "No Finding"]
    rng = np.random.default_rng(11)
    cells = rng.choice(
        [0.0, 1.0, -1.0, np.nan], size=(3000, len(columns)), p=[0.2, 0.05, 0.05, 0.7]
    )
    rows = [dict(zip(columns, map(float, r), strict=True)) for r in cells]
    reference = _glorias_5x200_rows(rows, FIVE, others)
    labels = cells[:, [columns.index(n) for n in FIVE]]
    rest = cells[:, [columns.index(n) for n in others]]
    counts = {c: len(reference[n]) for c, n in enumerate(FIVE)}
    with pytest.raises(zero_shot_prompts.PromptError, match=re.escape(str(counts))):
        zero_shot.draw_5x200(labels, 10_000, 0, "mimic_cxr_jpg split 'test'", rest)
    per_class = min(counts.values())
    assert per_class >= 5  # the draw below has something to choose from
    for seed in range(3):
        chosen = zero_shot.draw_5x200(labels, per_class, seed, "x", rest)
        for c, name in enumerate(FIVE):
            assert set(chosen[c]) <= reference[name]
    alone = _glorias_5x200_rows(rows, FIVE[:1], others)[FIVE[0]]
    everything = zero_shot.draw_5x200(labels[:, :1], len(alone), 0, "x", rest)
    assert set(everything[0]) == alone


def test_precision_at_k_by_brute_force():
    rng = np.random.default_rng(2)
    query, gallery = rng.normal(size=(7, 3)), rng.normal(size=(12, 3))
    query_class, gallery_class = rng.integers(0, 3, 7), rng.integers(0, 3, 12)
    got = zero_shot_metrics.precision_at_k(query, gallery, query_class, gallery_class, (1, 5))
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    for k in (1, 5):
        expected = np.mean(
            [
                np.mean(
                    [gallery_class[j] == query_class[i]
                     for j in sorted(range(12), key=lambda j: -cos(query[i], gallery[j]))[:k]]
                )
                for i in range(7)
            ]
        )  # fmt: skip
        assert got[f"P@{k}"] == pytest.approx(expected)


FIVE = list(chexpert.CLASS_NAMES)


@pytest.fixture(scope="module")
def chexpert_dir(tmp_path_factory):
    """CheXpert laid out as released: in train.csv 3 patients positive for exactly each class,
    2 with two of the five and 2 negatives; prepared at the tiny run's crop."""
    root = tmp_path_factory.mktemp("chexpert-5x200") / "CheXpert-v1.0-small"
    cells = [[c] for c in range(5) for _ in range(3)] + [[0, 1], [2, 4], [], []]
    for split, table, patients in (("train", "train.csv", cells), ("valid", "valid.csv", [[1]])):
        rows = []
        for i, positive in enumerate(patients):
            path = f"CheXpert-v1.0-small/{split}/patient{i:05d}/study1/view1_frontal.jpg"
            labels = {n: "1.0" if c in positive else "0.0" for c, n in enumerate(FIVE)}
            rows.append(
                [path, "Female", 60, "Frontal", "AP"]
                + [labels.get(n, "") for n in CHEXPERT_HEADER[5:]]
            )
            _xray(root.parent / path, 10 * i, (40, 40))
        _write_csv(root / table, CHEXPERT_HEADER, rows)
    data_dir = tmp_path_factory.mktemp("chexpert-data")
    ensure_prepared(
        "chexpert", data_dir, manual_dir=str(root), image_size=32, num_validation=1, num_workers=0
    )
    return data_dir


def test_chexpert_5x200_on_a_fixture(run, chexpert_dir):
    config = zero_shot_config.get_config("dataset=chexpert_5x200")
    config.data.data_dir = str(chexpert_dir)
    config.per_class = 2
    results = zero_shot.evaluate(config, run)

    records = list(sources.open_source("chexpert", chexpert_dir, "2d", "train").open())
    labels = np.stack([r["labels"] for r in records])
    ids = [r["id"].decode() for r in records]
    chosen = zero_shot.draw_5x200(labels, 2, 0, "")
    selection = results["selection"]
    assert selection["ids"] == {n: [ids[r] for r in chosen[c]] for c, n in enumerate(FIVE)}
    assert (selection["split"], selection["per_class"], results["records"]) == ("train", 2, 10)

    model = inference.load(run)
    images = np.stack([transforms.eval_transform_2d(records[r]["image"], 32) for r in chosen.flat])
    prompts = zero_shot_prompts.load_prompts(
        zero_shot_prompts.prompts_path("chexpert_5x200")
    ).classes
    scores = zero_shot_metrics.class_scores(
        model.embed_images(images), [model.embed_texts(list(prompts[n])) for n in FIVE]
    )
    truth, predicted = np.repeat(np.arange(5), 2), scores.argmax(1)
    found = results["zero_shot"]
    assert found["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    f1 = f1_score(truth, predicted, average=None, labels=range(5), zero_division=0)
    recall = recall_score(truth, predicted, average=None, labels=range(5), zero_division=0)
    for c, name in enumerate(FIVE):
        assert found["classes"][name]["f1"] == pytest.approx(f1[c])
        assert found["classes"][name]["recall"] == pytest.approx(recall[c])
    assert "retrieval" not in results  # CheXpert has no reports
    ct_worded = zero_shot_prompts.load_prompts(
        zero_shot_prompts.prompts_path("chexpert_5x200")
    ).cross_modal
    cross = zero_shot_metrics.class_scores(
        model.embed_images(images), [model.embed_texts(list(ct_worded.classes[n])) for n in FIVE]
    ).argmax(1)
    assert results["zero_shot_cross_modal"]["accuracy"] == pytest.approx(np.mean(cross == truth))


def _mimic_report(c: int) -> str:
    return (
        f" FINDINGS:\n\n Finding {FIVE[c].lower()} number {c}.  The rest is stable.\n\n"
        " IMPRESSION:\n\n No other acute process.\n"
    )


@pytest.fixture(scope="module")
def mimic_dir(tmp_path_factory):
    """MIMIC-CXR-JPG laid out as released (as tests/test_builders_real.py builds it), with its
    label conventions (1, 0, -1 uncertain, blank): in the test split 3 frontal images per class
    that GLoRIA's 5x200 takes (positive for that one class, the rest 0 or blank) and 2 it leaves
    out (another of the five uncertain; Pneumonia positive too); one image in train and in
    validation. Returns (data_dir, the ids of the images GLoRIA takes)."""
    root = tmp_path_factory.mktemp("mimic-5x200")
    labels = mimic_cxr_jpg.CHEXPERT_LABELS
    images = [(f"d{i:02d}", f"100000{i:02d}", f"500000{i:02d}", i % 5, {}) for i in range(15)]
    for c in range(5):  # positive for class c, and uncertain for the next / Pneumonia positive
        images.append((f"u{c}", f"1000010{c}", f"5000010{c}", c, {FIVE[(c + 1) % 5]: "-1.0"}))
        images.append((f"p{c}", f"1000020{c}", f"5000020{c}", c, {"Pneumonia": "1.0"}))
    images += [(f"d{i}", f"100000{i}", f"500000{i}", None, {}) for i in (98, 99)]
    chexpert_rows = []
    for i, (dicom, subject, study, c, cells) in enumerate(images):
        study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        _jpeg(study_dir / f"s{study}" / f"{dicom}.jpg", i)
        (study_dir / f"s{study}.txt").write_text(_mimic_report(c or 0))
        blank = i % 3 == 0  # some studies leave the unmentioned labels blank
        row = {n: "" if blank else "0.0" for n in labels} | cells
        if c is not None:
            row[FIVE[c]] = "1.0"
        chexpert_rows.append([subject, study, *(row[n] for n in labels)])
    _write_csv(
        root / mimic_cxr_jpg.METADATA,
        ["dicom_id", "subject_id", "study_id", "ViewPosition"],
        [[d, sub, st, "PA"] for d, sub, st, *_ in images],
    )
    _write_csv(
        root / mimic_cxr_jpg.SPLIT,
        ["dicom_id", "study_id", "subject_id", "split"],
        [
            [d, st, sub, {"d98": "train", "d99": "validate"}.get(d, "test")]
            for d, sub, st, *_ in images
        ],
    )
    _write_csv(
        root / mimic_cxr_jpg.CHEXPERT,
        ["subject_id", "study_id", *mimic_cxr_jpg.CHEXPERT_LABELS],
        chexpert_rows,
    )
    data_dir = tmp_path_factory.mktemp("mimic-data")
    ensure_prepared("mimic_cxr_jpg", data_dir, manual_dir=str(root), image_size=32, num_workers=0)
    return data_dir, {d for d, *_ in images[:15]}


def test_mimic_5x200_adds_retrieval_precision_by_class(run, mimic_dir, tmp_path):
    mimic_dir, glorias = mimic_dir
    proc = _cli(
        "--config=configs/zero_shot.py:dataset=mimic_5x200",
        f"--config.data.data_dir={mimic_dir}",
        "--config.per_class=3",
        f"--workdir={run}",
        f"--out={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["benchmark"] == "mimic_5x200" and results["records"] == 15
    assert {len(v) for v in results["selection"]["ids"].values()} == {3}
    # GLoRIA's selection on MIMIC's label conventions: uncertain anywhere or another finding
    # positive leaves an image out; blank reads as 0.
    assert {i for v in results["selection"]["ids"].values() for i in v} == glorias

    model = inference.load(run)
    records = list(sources.open_source("mimic_cxr_jpg", mimic_dir, "2d", "test").open())
    by_id = {r["id"].decode(): r for r in records}
    order = [i for n in FIVE for i in results["selection"]["ids"][n]]
    images = np.stack([transforms.eval_transform_2d(by_id[i]["image"], 32) for i in order])
    reports = [by_id[i]["report"].decode() for i in order]
    sim = model.embed_images(images) @ model.embed_texts(reports).T
    truth = np.repeat(np.arange(5), 3)
    top5 = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    expected = np.mean(truth[top5] == truth[:, None])
    assert results["retrieval"]["image_to_text"]["P@5"] == pytest.approx(expected)
    by_class = results["retrieval"]["image_to_text_by_class"]
    assert np.mean([by_class[n]["P@5"] for n in FIVE]) == pytest.approx(expected)
