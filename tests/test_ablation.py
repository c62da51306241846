"""python -m unimedi_jax.ablate: the line of docs/configs.md at tiny size (2 rows, 2 seeds, 2
steps), the table against numpy on its JSON, the rows' configs, rerun skipping, and the 2D-3D
distance."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs.pretrain import get_config
from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax.evaluation import metrics
from unimedi_jax.experiments import ablation

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("separate", "vl")
SEEDS = (0, 1)
BUDGET = 2


def _readme_line() -> list[str]:
    """The ablate command line of docs/configs.md, as arguments after ``python -m MODULE``."""
    found = re.findall(
        r"^python -m unimedi_jax\.ablate .*$", (ROOT / "docs" / "configs.md").read_text(), re.M
    )
    assert len(found) == 1, found
    return shlex.split(found[0])[3:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ablation_data")
    tiny_run_config(path)  # prepares the tiny phantoms
    return path


@pytest.fixture(scope="module")
def out(tmp_path_factory, data_dir) -> Path:
    """The docs' line, run as written from a fresh folder, then narrowed to the tiny preset
    (later flags win): rows separate and vl, seeds 0 and 1, 2 steps each."""
    root = tmp_path_factory.mktemp("readme_ablation")
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu"}
    args = [
        *_readme_line(),
        f"--config={ROOT / 'configs' / 'pretrain.py'}:tiny",
        f"--config.data.data_dir={data_dir}",
        f"--budget_steps={BUDGET}",
        f"--seeds={','.join(map(str, SEEDS))}",
        f"--rows={','.join(ROWS)}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "unimedi_jax.ablate", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "wrote runs/ablation/ablation.md"
    return root / "runs" / "ablation"


def _tiny_base(data_dir: Path):
    config = get_config("tiny")
    config.data.data_dir = str(data_dir)
    return config


def test_table_is_mean_and_spread_over_seeds(out):
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["rows"]) == list(ROWS) and report["budget_steps"] == BUDGET
    table = (out / "ablation.md").read_text()
    for row in report["rows"].values():
        assert sorted(row["seeds"]) == [str(s) for s in SEEDS]
        assert "cross_modal/distance_2d_3d" in row["mean"]
        for figure, mean in row["mean"].items():
            values = np.array([row["seeds"][str(s)][figure] for s in SEEDS])
            np.testing.assert_allclose(mean, values.mean(), rtol=1e-12, equal_nan=True)
            np.testing.assert_allclose(
                row["spread"][figure], values.std(ddof=1), rtol=1e-12, equal_nan=True
            )
        key = "cross_modal/image_to_volume_mAP"
        cell = f"{row['mean'][key]:.3f} ± {row['spread'][key]:.3f}"
        line = next(x for x in table.splitlines() if x.startswith(f"| {row['label']} |"))
        assert cell in line, (cell, line)
    assert "share no space" in table
    assert list(report["tsne"]) == [ablation.TSNE_FILE]  # the rows of no other figure ran
    figure = Image.open(out / ablation.TSNE_FILE)
    assert figure.size[0] > figure.size[1]
    assert f"![t-SNE of the held-out X-rays and CTs per model]({ablation.TSNE_FILE})" in table


def test_separate_models_are_compared_across_their_spaces(out):
    """Row (a)'s cross-modal figures: the X-ray model's X-rays against the CT model's CTs."""
    report = json.loads((out / "ablation.json").read_text())
    for seed in SEEDS:
        xray = ablation.load_embeddings(ablation.run_dir(out, "separate", "xray", seed))
        ct = ablation.load_embeddings(ablation.run_dir(out, "separate", "ct", seed))
        assert "volume_emb" not in xray and "image_emb" not in ct
        found = report["rows"]["separate"]["seeds"][str(seed)]
        expected = metrics.label_map(
            xray["image_emb"], xray["image_labels"], ct["volume_emb"], ct["volume_labels"]
        )
        np.testing.assert_allclose(found["cross_modal/image_to_volume_mAP"], expected, rtol=1e-12)
        assert "slice_selection/hit_rate" in found  # the CT model's
        assert "zero_shot_image/mean_auroc" in found  # the X-ray model's


def test_rerun_skips_finished_runs(out, data_dir, monkeypatch):
    before = json.loads((out / "ablation.json").read_text())

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(ablation.by_kind, "run", must_not_run)
    monkeypatch.setattr(ablation, "evaluate_run", must_not_run)
    after = ablation.run_ablation(_tiny_base(data_dir), out, ROWS, SEEDS, BUDGET)
    assert json.dumps(after["rows"]) == json.dumps(before["rows"])
    with pytest.raises(ablation.AblationError, match="budget_steps"):
        ablation.run_ablation(_tiny_base(data_dir), out, ROWS, SEEDS, BUDGET + 1)


def test_reevaluate_gives_finished_runs_todays_evaluators_without_training(
    out, data_dir, tmp_path, monkeypatch
):
    """A run finished before an evaluator was named gets its figures from the same checkpoint,
    its older figures unchanged."""
    copy = tmp_path / "ablation"
    shutil.copytree(out, copy)
    before = json.loads((out / "ablation.json").read_text())["rows"]["vl"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation.by_kind, "run", must_not_run)
    base = _tiny_base(data_dir)
    assert "slice_choice" in base.evals
    run = ablation.run_dir(copy, "vl", "", 0)
    saved = json.loads((run / "config.json").read_text())
    saved["evals"] = [e for e in saved["evals"] if e != "slice_choice"]  # as saved before it
    (run / "config.json").write_text(json.dumps(saved))
    stale = json.loads((run / ablation.RUN_RESULTS).read_text())
    stale["figures"] = {k: v for k, v in stale["figures"].items() if "slice_choice" not in k}
    (run / ablation.RUN_RESULTS).write_text(json.dumps(stale))
    skipped = ablation.run_ablation(base, copy, ("vl",), (0,), BUDGET)["rows"]["vl"]["seeds"]["0"]
    assert not any("slice_choice" in k for k in skipped)
    again = ablation.run_ablation(base, copy, ("vl",), (0,), BUDGET, reevaluate=True)
    found = again["rows"]["vl"]["seeds"]["0"]
    assert any(k.startswith("slice_choice/oracle/") for k in found)
    assert found == pytest.approx(before["seeds"]["0"], nan_ok=True)


def _flat(config) -> dict:
    def walk(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(config, ""))


def test_rows_differ_from_the_preset_exactly_as_intended():
    base = get_config("demo")
    reference = _flat(ablation.run_config(base, {}, 1, 7))
    intended = {
        ("separate", "xray"): {"data.sources_3d": ""},
        ("separate", "ct"): {"data.sources_2d": ""},
        ("vl", ""): {"loss.self_distill": False, "selection.mode": "random"},
        ("vl_sd", ""): {"selection.mode": "random"},
        ("unimedi", ""): {},
        ("random_masking", ""): {"masking.mode": "random"},
        ("xray_unmasked", ""): {"masking.image_ratio": 0.0, "loss.pcl_modalities": ("volume",)},
        ("xray_mask_quarter", ""): {"masking.image_ratio": 0.25},
        ("xray_random_masking", ""): {"masking.image_mode": "random"},
        ("small_lesions_vl_sd", ""): {"data.phantom_lesions": "small", "selection.mode": "random"},
        ("small_lesions_unimedi", ""): {"data.phantom_lesions": "small"},
        ("small_lesions_oracle", ""): {"data.phantom_lesions": "small", "selection.mode": "oracle"},
    }
    assert {(r, p) for r, row in ablation.ROWS.items() for p in row.parts} == set(intended)
    for (row, part), changes in intended.items():
        flat = _flat(ablation.run_config(base, ablation.ROWS[row].parts[part], 1, 7))
        differ = {k: v for k, v in flat.items() if reference[k] != v}
        assert differ == changes, (row, part)
    assert (reference["seed"], reference["total_steps"], reference["eval_every_steps"]) == (1, 7, 0)
    assert _flat(base)["selection.mode"] == "attentive"  # the base is left as it was


def test_unknown_rows_are_refused(tmp_path):
    with pytest.raises(ablation.AblationError, match="valid: separate, vl"):
        ablation.run_ablation(get_config("tiny"), tmp_path, ("vl", "clip"))


def test_modality_distance_hand_computed():
    r = np.sqrt(0.5)
    # Finding 0: X-rays (1,0), (0,1) -> centroid (.5,.5), spread r; CTs (-1,0), (0,-1) ->
    # centroid (-.5,-.5), spread r; centroids sqrt(2) apart -> 2.0.
    # Finding 1: X-rays (0,1), (r,r) -> centroid (r/2, 1/2 + r/2), spread = half their chord
    # sqrt(2 - 2r)/2; CTs (0,1), (1,0) -> centroid (.5,.5), spread r.
    # Finding 2: a single CT positive -> left out.
    xray = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # normalised by the metric
    xray_labels = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]])
    ct = np.array([[-1.0, 0.0], [0.0, -4.0], [0.0, 1.0], [1.0, 0.0]])
    ct_labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 0]])
    gap_1 = np.hypot(r / 2 - 0.5, 0.5 + r / 2 - 0.5)
    ratio_1 = gap_1 / ((np.sqrt(2 - 2 * r) / 2 + r) / 2)
    found = metrics.modality_distance(xray, xray_labels, ct, ct_labels)
    np.testing.assert_allclose(found, (2.0 + ratio_1) / 2, rtol=1e-12)
    # The same space, the same findings: 0.
    assert metrics.modality_distance(xray, xray_labels, xray, xray_labels) == pytest.approx(0.0)
    assert np.isnan(metrics.modality_distance(xray[:1], xray_labels[:1], ct, ct_labels))


def test_probe_columns_by_modality_and_fraction():
    """The linear probe's figures (not in the tiny preset) as columns, 1% before 10% before
    100%, X-ray before CT, in both tables."""
    per_seed = {
        0: {"linear_probe_volume/auroc@1": 0.5, "linear_probe_image/auroc@0.1": 0.6},
        1: {"linear_probe_volume/auroc@1": 0.7, "linear_probe_image/auroc@0.1": 0.8},
    }
    per_seed = {s: {**f, "linear_probe_image/auroc@0.01": 0.4 + s} for s, f in per_seed.items()}
    row = {"label": "r", "note": "", **ablation.summarize(per_seed)}
    report = {"preset": "demo", "budget_steps": 3, "seeds": [0, 1], "eval_split": "test"}
    text = ablation.render({**report, "rows": {"unimedi": row}, "tsne": None})
    header = next(x for x in text.splitlines() if x.startswith("| row |") and "probe" in x)
    assert header.endswith(
        "| probe X-ray auroc 1% | probe X-ray auroc 10% | probe CT auroc 100% |"
    ), header
    assert text.count("| r | 0.900 ± 0.707 | 0.700 ± 0.141 | 0.600 ± 0.141 |") == 2


def test_xray_masking_rows_get_their_own_table_beside_the_paper_rows():
    per_seed = {s: {"zero_shot_image/mean_auroc": 0.7 + s / 10} for s in (0, 1)}
    row = {"label": "r", "note": "", **ablation.summarize(per_seed)}
    report = {"preset": "demo", "budget_steps": 3, "seeds": [0, 1], "eval_split": "test"}
    rows = {"vl": row, "unimedi": row}
    assert "masking the X-rays" not in ablation.render({**report, "rows": rows, "tsne": None})
    text = ablation.render({**report, "rows": {**rows, "xray_unmasked": row}, "tsne": None})
    table = text.split("### Beyond the paper: masking the X-rays")[1]
    assert table.count("| r | 0.750 ± 0.071 |") == 3  # vl, unimedi and the X-ray row


def test_small_lesion_rows_get_their_table_with_the_findings_one_by_one():
    per_seed = {
        s: {"zero_shot_volume/auroc/nodule": 0.6 + s / 10, "slice_selection/hit_rate/nodule": 0.5}
        for s in (0, 1)
    }
    row = {"label": "r", "note": "", **ablation.summarize(per_seed)}
    report = {"preset": "demo", "budget_steps": 3, "seeds": [0, 1], "eval_split": "test"}
    rows = {"unimedi": row}
    assert "slices that matter" not in ablation.render({**report, "rows": rows, "tsne": None})
    text = ablation.render({**report, "rows": {**rows, "small_lesions_unimedi": row}, "tsne": None})
    table = text.split("### Beyond the paper: slices that matter")[1]
    header = next(x for x in table.splitlines() if x.startswith("| row |"))
    assert header == "| row | CT nodule | slice hits: nodule |"
    assert "| r | 0.650 ± 0.071 | 0.500 ± 0.000 |" in table
    assert "by the slices the model is shown" not in text  # no slice_choice figures
    for seed, found in per_seed.items():
        found["slice_choice/oracle/auroc/nodule"] = 0.9 - seed / 10
        found["linear_probe_volume/auroc@0.01"] = 0.7
    row = {"label": "r", "note": "", **ablation.summarize(per_seed)}
    text = ablation.render({**report, "rows": {"small_lesions_oracle": row}, "tsne": None})
    first, table = text.split("by the slices the model is shown")
    assert "probe CT auroc 1%" in first
    assert "| row | nodule: Eq. 2 slices | oracle |" in table  # no probe columns
    assert "| r | 0.650 ± 0.071 | 0.850 ± 0.071 |" in table


def test_rows_of_another_lesion_setting_get_their_own_phantoms(tmp_path, monkeypatch):
    """Each run is prepared for its own config: a small-lesion row reads phantoms built with
    small lesions in out/data_small_lesions, the preset's rows those in out/data."""
    prepared = []

    def record(config, root):
        prepared.append((config.data.phantom_lesions, config.data.data_dir, root))

    def no_training(config, workdir, reevaluate):
        raise StopIteration(config.data.phantom_lesions)

    monkeypatch.setattr(ablation, "prepare_demo_data", record)
    monkeypatch.setattr(ablation, "train_and_evaluate", no_training)
    base = get_config("demo")
    for row, lesions in (("unimedi", "lobar"), ("small_lesions_vl_sd", "small")):
        with pytest.raises(StopIteration, match=lesions):
            ablation.run_ablation(base, tmp_path, (row,), (0,), 2)
    assert prepared == [("lobar", "", tmp_path), ("small", "", tmp_path)]


def test_each_group_of_rows_gets_its_own_tsne(tmp_path, monkeypatch):
    """A t-SNE per group of rows that ran (the paper's, the X-ray masking rows beside UniMedI,
    the small-lesion rows), a panel per row run, each named in ablation.md."""
    rng = np.random.default_rng(0)
    findings = np.asarray(["nodule", "cardiomegaly"])
    for row in ("unimedi", "xray_unmasked", "small_lesions_vl_sd"):
        arrays = {"dataset": np.asarray("phantoms")}
        for key in ("image", "volume"):
            arrays[f"{key}_emb"] = rng.normal(size=(40, 8))
            arrays[f"{key}_labels"] = rng.integers(0, 2, (40, 2)).astype(np.float32)
            arrays[f"{key}_findings"] = findings
        path = ablation.run_dir(tmp_path, row, "", 0)
        path.mkdir(parents=True)
        np.savez(path / ablation.RUN_EMBEDDINGS, **arrays)
    drawn_panels = {}
    real = ablation.figures.tsne_side_by_side

    def recording(panels, *args, **kwargs):
        drawn_panels[len(drawn_panels)] = list(panels)
        return real(panels, *args, **kwargs)

    monkeypatch.setattr(ablation.figures, "tsne_side_by_side", recording)
    label = {name: ablation.ROWS[name].label for name in ablation.ROWS}
    drawn = ablation.draw_tsne(tmp_path, ("unimedi", "xray_unmasked"), 0)
    assert list(drawn) == [ablation.TSNE_FILE, "tsne_xray_masking.png"]
    assert drawn_panels == {0: [label["unimedi"]], 1: [label["unimedi"], label["xray_unmasked"]]}
    assert all((tmp_path / file).is_file() for file in drawn)
    drawn_panels.clear()
    assert list(ablation.draw_tsne(tmp_path, ("small_lesions_vl_sd",), 0)) == [
        "tsne_small_lesions.png"
    ]
    assert drawn_panels == {0: [label["small_lesions_vl_sd"]]}
    report = {"preset": "demo", "budget_steps": 3, "seeds": [0], "eval_split": "test"}
    text = ablation.render({**report, "rows": {}, "tsne": drawn})
    assert "![t-SNE per model: masking the X-rays](tsne_xray_masking.png)" in text
