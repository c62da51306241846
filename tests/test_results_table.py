"""paper_tables, the library of ``python -m unimedi_jax.results_table``: hand-made eval.json
files -> the paper's Tables 1-3 in Markdown."""

import json

import pytest
from PIL import Image

from unimedi_jax.evaluation import comparison_plot, paper_tables, published


def _probe(dataset, metric, fractions, encoder="pretrained", run="/runs/paper", step=1000):
    return {
        "kind": "probe",
        "dataset": dataset,
        "metric": metric,
        "encoder": encoder,
        "checkpoint": run,
        "step": step,
        "with_slices": False,
        "fractions": {f: {metric: v, "loss": 0.5, "n_train": 10} for f, v in fractions.items()},
    }


def _finetune(dataset, metric, value, run="/runs/paper"):
    test = {metric: value, "loss": 0.3}
    return {"kind": "finetune", "dataset": dataset, "metric": metric, "encoder": "pretrained",
            "checkpoint": run, "step": 1000, "test": test}  # fmt: skip


EVAL_FILES = {
    "paper/probe/chexpert-0.01_0.1_1.0": _probe(
        "chexpert", "auroc", {"0.01": 0.8812, "0.1": 0.89, "1.0": 0.9049}
    ),
    "paper/probe/covidx-1.0": _probe("covidx", "accuracy", {"1.0": 0.9}),
    "paper/probe/chexpert-0.01-random_init": _probe(
        "chexpert", "auroc", {"0.01": 0.561}, encoder="random_init"
    ),
    "paper/probe/cc_ccii-0.01_0.1_1.0": _probe(
        "cc_ccii", "accuracy", {"0.01": 0.75, "0.1": float("nan"), "1.0": 0.894}
    ),
    "paper/finetune/cc_ccii": _finetune("cc_ccii", "accuracy", 0.938),
    "paper/finetune/luna16": _finetune("luna16", "auroc", 0.9591),
    "demo/probe/phantoms_xray-1.0": _probe(
        "phantoms/xray", "auroc", {"1.0": 0.8}, run="/runs/demo", step=300
    ),
    "demo": {"retrieval_image/image_to_text/R@1": 0.5},  # a pre-training eval.json: skipped
}

EXPECTED = """\
### Table 1: linear probe, 2D (AUROC % for CheXpert and RSNA, ACC % for COVIDx)

| Method | CheXpert 1% | CheXpert 10% | CheXpert 100% | RSNA 1% | RSNA 10% | RSNA 100% | COVIDx 1% | COVIDx 10% | COVIDx 100% |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| UniMedI (published) | 89.4 | 89.7 | 90.5 | 90.0 | 90.4 | 91.5 | 80.3 | 92.4 | 94.6 |
| Random Init (published) | 56.1 | 62.6 | 65.7 | 58.9 | 69.4 | 74.1 | 50.5 | 60.3 | 70.0 |
| Random Init (paper) | 56.1 | - | - | - | - | - | - | - | - |
| paper @1000 | 88.1 | 89.0 | 90.5 | - | - | - | - | - | 90.0 |

### Table 2: linear probe, 3D (ACC %)

| Method | CC-CCII 1% | CC-CCII 10% | CC-CCII 100% |
|---|---:|---:|---:|
| UniMedI (published) | 75.6 | 84.8 | 89.4 |
| Random Init (published) | 43.4 | 69.7 | 74.8 |
| paper @1000 | 75.0 | - | 89.4 |

### Table 3: full fine-tuning, 3D (ACC % for CC-CCII, AUC % for LUNA)

| Method | CC-CCII | LUNA |
|---|---:|---:|
| UniMedI (published) | 93.8 | 95.9 |
| paper @1000 | 93.8 | 95.9 |

### Other linear probes (AUROC %, ACC % for multiclass)

| Method | phantoms/xray 100% |
|---|---:|
| demo @300 | 80.0 |
"""  # noqa: E501


@pytest.fixture
def runs(tmp_path):
    for directory, content in EVAL_FILES.items():
        (tmp_path / directory).mkdir(parents=True, exist_ok=True)
        (tmp_path / directory / "eval.json").write_text(json.dumps(content))
    return tmp_path


def test_renders_the_paper_tables_with_the_runs(runs):
    assert paper_tables.tables_of([str(runs / "paper"), str(runs / "demo")]) == EXPECTED


def test_a_later_file_for_the_same_cell_wins_with_a_warning(runs, capsys):
    again = runs / "paper" / "rerun" / "eval.json"
    again.parent.mkdir()
    again.write_text(json.dumps(_probe("covidx", "accuracy", {"1.0": 0.5})))
    out = paper_tables.tables_of([runs])
    err = capsys.readouterr().err
    assert "| paper @1000 | 88.1 | 89.0 | 90.5 | - | - | - | - | - | 50.0 |" in out
    assert "rerun/eval.json replaces" in err


def test_no_results_is_a_user_error_naming_the_paths(tmp_path):
    with pytest.raises(
        paper_tables.NoResultsError, match=r"no probe, fine-tuning or zero-shot eval\.json"
    ):
        paper_tables.tables_of([tmp_path])


# ---------------------------------------------------------------- published rows, from data

SHIPPED = {"ct_rate": ("zero_shot", "report_to_volume"), "rad_chestct": ("zero_shot",)}


def test_shipped_published_figures_carry_their_sources():
    shared = json.loads(published.published_path("ct_rate").read_text())
    for benchmark, tables in SHIPPED.items():
        found = published.load_published(published.published_path(benchmark))
        assert set(found.tables) == set(tables)
        for row in (r for t in tables for r in found.rows(t)):
            assert row.sources and all(found.sources[k].line for k in row.sources)
    ct_clip = published.load_published(published.published_path("ct_rate")).rows("zero_shot")[0]
    assert ct_clip.figures == {"auroc": 0.731, "f1": 0.707, "accuracy": 0.668, "precision": 0.323}
    assert "0.731 | 0.707" in shared["sources"]["EXACT-S4"]["line"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"method": "M", "auroc": 0.7}, "'M' has no source"),
        ({"method": "M", "auroc": 0.7, "source": []}, "'M' has no source"),
        ({"method": "M", "auroc": 0.7, "source": ["elsewhere"]}, r"cites \['elsewhere'\]"),
        (
            {"method": "M", "auroc": 73.1, "source": ["S"]},
            r"fractions in \[0, 1\]; bad: \['auroc'\]",
        ),
    ],
)
def test_a_figure_without_a_source_is_refused(tmp_path, row, message):
    path = tmp_path / "mine.json"
    source = {"what": "a table", "where": "a README", "line": "| M | 0.7 |"}
    path.write_text(json.dumps({"sources": {"S": source}, "tables": {"zero_shot": [row]}}))
    with pytest.raises(published.PublishedError, match=message) as err:
        published.load_published(path)
    assert str(path) in str(err.value)


def test_a_source_without_the_line_read_is_refused(tmp_path):
    path = tmp_path / "mine.json"
    row = {"method": "M", "auroc": 0.7, "source": ["S"]}
    path.write_text(
        json.dumps({"sources": {"S": {"what": "a", "where": "b"}}, "tables": {"t": [row]}})
    )
    with pytest.raises(published.PublishedError, match="source 'S' needs what, where, line"):
        published.load_published(path)


def _zero_shot(benchmark, figures, run="/runs/paper", step=500):
    return {"kind": "zero_shot", "benchmark": benchmark, "dataset": benchmark,
            "encoder": "pretrained", "checkpoint": run, "step": step,
            "prompts": f"/x/{benchmark}.json", "zero_shot": figures}  # fmt: skip


def test_published_rows_stand_above_ours_with_their_sources(tmp_path):
    figures = {"mean_auroc": 0.7, "mean_auroc_ci": [0.65, 0.75], "mean_f1": 0.6,
               "mean_accuracy": 0.55, "mean_precision": 0.3}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(_zero_shot("ct_rate", figures)))
    out = paper_tables.tables_of([tmp_path])
    lines = out[out.index("### CT-RATE zero-shot") :].splitlines()
    assert lines[2] == "| Method | AUROC | F1 (weighted) | ACC | Precision | Source |"
    assert lines[4] == (
        "| CT-CLIP (zero-shot) | 73.1 | 70.7 | 66.8 | 32.3 | as reported in EXACT-S4, "
        "CTCLIP_MODERN (secondary) |"
    )
    rows = published.load_published(published.published_path("ct_rate")).rows("zero_shot")
    ours = 4 + len(rows)
    assert lines[ours] == (
        "| paper @500 | 70.0 | 60.0 | 55.0 | 30.0 | prompts ct_rate.json; AUROC 95% CI 65.0-75.0 |"
    )
    notes = lines[ours + 1 :]
    assert "- CT-CLIP (zero-shot): AUROC, F1 (weighted), ACC, Precision" in notes
    assert "- EXACT (zero-shot): AUROC, F1 (weighted), ACC" in notes
    assert any(
        n.startswith("- EXACT-S4: EXACT (Bai et al.)")
        and n.endswith("line read: `| CT-CLIP (Zero-shot) | 0.731 | 0.707 | 0.668 | |`")
        for n in notes
    )
    assert "### Table 1" in out and "RSNA Pneumonia zero-shot" not in out


def test_a_table_without_published_rows_says_why(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(_zero_shot("mimic_5x200", {"accuracy": 0.4})))
    block = paper_tables.tables_of([tmp_path]).split("### MIMIC-CXR 5x200")[1]
    assert "| paper @500 | 40.0 | prompts mimic_5x200.json |" in block
    assert "no published row: no GLoRIA, MGCA or MedCLIP figure" in block


def test_retrieval_tables_show_ct_clips_published_recall_beside_ours(tmp_path):
    result = _zero_shot("ct_rate", {"mean_auroc": 0.7})
    result["ct_clip_retrieval"] = {"report_to_volume/R@5": 0.05, "report_to_volume/R@10": 0.1,
                                   "report_to_volume/R@50": float("nan"),
                                   "volume_to_volume/MAP@1": 0.4}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(result))
    out = paper_tables.tables_of([tmp_path])
    recall = out.split("### CT-RATE report-to-volume retrieval")[1].splitlines()
    assert recall[2] == "| Method | R@5 | R@10 | R@50 | R@100 | Source |"
    assert recall[4] == (
        "| CT-CLIP (zero-shot) | 2.9 | 5.0 | 18.0 | 28.7 | as reported in CT-CLIP-issue-40 "
        "(secondary) |"
    )
    assert recall[5] == "| paper @500 | 5.0 | 10.0 | - | - | prompts ct_rate.json |"
    assert "- CT-CLIP (zero-shot): R@5, R@10, R@50, R@100" in recall
    assert any(line.startswith("- CT-CLIP-issue-40: a user quoting") for line in recall)
    volume = out.split("### CT-RATE volume-to-volume retrieval")[1].splitlines()
    assert volume[4] == "| paper @500 | 40.0 | - | - | - | prompts ct_rate.json |"
    assert "no published row: CT-CLIP's MAP@K could not be read from a source we trust." in volume


def test_the_ct_rate_comparison_plot_draws_published_rows_and_our_interval(tmp_path):
    ours = _zero_shot("ct_rate", {"mean_auroc": 0.7, "mean_auroc_ci": [0.65, 0.75]})
    out = comparison_plot.write_comparison_plot([ours], tmp_path / "ct_rate.png")
    with Image.open(out) as png:
        points = json.loads(png.text["Description"])
        assert png.text["Title"] == comparison_plot.TITLE and png.size[0] > 0
    rows = published.load_published(published.published_path("ct_rate")).rows("zero_shot")
    assert [p["method"] for p in points] == [r.method for r in rows] + ["paper @500"]
    assert [p["auroc"] for p in points[:-1]] == [r.figures["auroc"] for r in rows]
    assert points[0]["published"] == ["EXACT-S4", "CTCLIP_MODERN"]
    assert points[-1] == {"method": "paper @500", "auroc": 0.7, "interval": [0.65, 0.75],
                          "published": []}  # fmt: skip
    figure = comparison_plot.comparison_figure(points)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == [p["method"] for p in points]


def test_plotting_without_a_ct_rate_result_says_what_to_run():
    with pytest.raises(comparison_plot.PlotError, match="dataset=ct_rate"):
        comparison_plot.comparison_points([_zero_shot("rad_chestct", {"mean_auroc": 0.6})])
