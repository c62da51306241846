"""Downstream results as the paper's tables: the library of ``python -m unimedi_jax.results_table``.

``tables_of`` finds the ``eval.json`` files that ``python -m unimedi_jax.evaluate`` (linear
probe) and ``python -m unimedi_jax.finetune`` write under the given directories (or the files
themselves) and renders Markdown tables laid out like the paper's Tables 1-3, in %, with the
paper's UniMedI and Random Init rows first for comparison. A row is an encoder: a run at a
checkpoint step, or "Random Init (run)". Cells without a result are '-'. Results on other
datasets (the phantoms, a LUNA16 probe, ...) go to an "Other" table. Zero-shot benchmarks
(``configs/zero_shot.py``) get a table each (``ZERO_SHOT_TABLES``), after the published figures
of the same protocol from ``configs/published/<benchmark>.json``, marked as reported in their
secondary sources, which are listed below the table with the line read. Pre-training
evaluations' eval.json are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from unimedi_jax.core.errors import UserError
from unimedi_jax.evaluation.published import Published, Row, load_published, published_path
from unimedi_jax.evaluation.tasks import FRACTIONS


class NoResultsError(UserError):
    """None of the paths given holds a probe, fine-tuning or zero-shot eval.json."""


_PERCENT = {0.01: "1%", 0.1: "10%", 1.0: "100%"}
_METRIC = {"auroc": "AUROC", "accuracy": "ACC"}

Column = tuple[str, str, float | None]  # (kind, dataset, label fraction; None: fine-tuning)


@dataclasses.dataclass(frozen=True)
class Table:
    """One of the paper's tables: its columns and its published rows (in %)."""

    title: str
    kind: str  # 'probe' | 'finetune'
    datasets: tuple[tuple[str, str], ...]  # (dataset name, column title)
    fractions: tuple[float | None, ...]
    paper: dict[str, tuple[float, ...]]

    @property
    def columns(self) -> list[Column]:
        return [(self.kind, d, f) for d, _ in self.datasets for f in self.fractions]

    @property
    def headers(self) -> list[str]:
        titles = dict(self.datasets)
        return [" ".join(filter(None, (titles[d], _PERCENT.get(f)))) for _, d, f in self.columns]


PAPER_TABLES = (
    Table(
        "Table 1: linear probe, 2D (AUROC % for CheXpert and RSNA, ACC % for COVIDx)",
        "probe",
        (("chexpert", "CheXpert"), ("rsna_pneumonia", "RSNA"), ("covidx", "COVIDx")),
        FRACTIONS,
        {
            "UniMedI (published)": (89.4, 89.7, 90.5, 90.0, 90.4, 91.5, 80.3, 92.4, 94.6),
            "Random Init (published)": (56.1, 62.6, 65.7, 58.9, 69.4, 74.1, 50.5, 60.3, 70.0),
        },
    ),
    Table(
        "Table 2: linear probe, 3D (ACC %)",
        "probe",
        (("cc_ccii", "CC-CCII"),),
        FRACTIONS,
        {"UniMedI (published)": (75.6, 84.8, 89.4), "Random Init (published)": (43.4, 69.7, 74.8)},
    ),
    Table(
        "Table 3: full fine-tuning, 3D (ACC % for CC-CCII, AUC % for LUNA)",
        "finetune",
        (("cc_ccii", "CC-CCII"), ("luna16", "LUNA")),
        (None,),
        {"UniMedI (published)": (93.8, 95.9)},
    ),
)


@dataclasses.dataclass(frozen=True)
class ZeroShotTable:
    """A zero-shot benchmark's figures (in %) after the published rows of the same protocol
    (``configs/published/<benchmark>.json``, each with its sources), or why there are none."""

    title: str
    benchmark: str  # configs/zero_shot.py's dataset=NAME
    section: str  # the eval.json entry holding the figures
    figures: tuple[tuple[str, str, str], ...]  # (key in section, column title, published key)
    published_table: str = "zero_shot"  # the table of the published file it shows
    unpublished: str = ""  # why no published row stands beside ours

    def published(self) -> Published | None:
        path = published_path(self.benchmark)
        return load_published(path) if path.is_file() else None


_CT_CLIP_FIGURES = (
    ("mean_auroc", "AUROC", "auroc"),
    ("mean_f1", "F1 (weighted)", "f1"),
    ("mean_accuracy", "ACC", "accuracy"),
    ("mean_precision", "Precision", "precision"),
)
_NO_SOURCE = (
    "no published row: no GLoRIA, MGCA or MedCLIP figure on this set could be read from a "
    "primary or secondary source we trust"
)
ZERO_SHOT_TABLES = (
    ZeroShotTable(
        "CT-RATE zero-shot, 18 abnormalities (CT-CLIP's protocol; means over the abnormalities, %)",
        "ct_rate",
        "zero_shot",
        _CT_CLIP_FIGURES,
    ),
    ZeroShotTable(
        "CT-RATE report-to-volume retrieval (CT-CLIP's count: the report's own volume in the top "
        "K, %)",
        "ct_rate",
        "ct_clip_retrieval",
        tuple((f"report_to_volume/R@{k}", f"R@{k}", f"recall@{k}") for k in (5, 10, 50, 100)),
        published_table="report_to_volume",
    ),
    ZeroShotTable(
        "CT-RATE volume-to-volume retrieval (CT-CLIP's MAP@K over the abnormality labels, %)",
        "ct_rate",
        "ct_clip_retrieval",
        tuple((f"volume_to_volume/MAP@{k}", f"MAP@{k}", "") for k in (1, 5, 10, 50)),
        published_table="volume_to_volume",
        unpublished="no published row: CT-CLIP's MAP@K could not be read from a source we trust",
    ),
    ZeroShotTable(
        "RAD-ChestCT zero-shot, the abnormalities shared with CT-RATE (CT-CLIP's protocol, "
        "external set; means over the abnormalities, %)",
        "rad_chestct",
        "zero_shot",
        _CT_CLIP_FIGURES,
    ),
    ZeroShotTable(
        "RSNA Pneumonia zero-shot (pneumonia vs normal prompts, %)",
        "rsna_pneumonia",
        "zero_shot",
        (("auroc", "AUROC", ""), ("accuracy", "ACC", ""), ("f1", "F1", "")),
        unpublished=_NO_SOURCE,
    ),
    ZeroShotTable(
        "CheXpert 5x200 zero-shot (GLoRIA's protocol, %)",
        "chexpert_5x200",
        "zero_shot",
        (("accuracy", "ACC", ""),),
        unpublished=_NO_SOURCE,
    ),
    ZeroShotTable(
        "MIMIC-CXR 5x200 zero-shot (GLoRIA's protocol, %)",
        "mimic_5x200",
        "zero_shot",
        (("accuracy", "ACC", ""),),
        unpublished=_NO_SOURCE,
    ),
)


def find_results(paths: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(file, content) of every probe / fine-tuning eval.json at or under ``paths``, sorted."""
    files = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        files.update([path] if path.is_file() else path.rglob("eval.json"))
    found = []
    for file in sorted(files):
        content = json.loads(file.read_text())
        if content.get("kind") in ("probe", "finetune", "zero_shot"):
            found.append((file, content))
    return found


def row_label(result: dict[str, Any]) -> str:
    """The encoder a result measured: 'RUN @STEP' ('+slices' when used), or 'Random Init (RUN)'."""
    run = Path(result["checkpoint"]).name
    if result["encoder"] == "random_init":
        return f"Random Init ({run})"
    return f"{run} @{result['step']}" + (" +slices" if result.get("with_slices") else "")


def cells(result: dict[str, Any]) -> dict[Column, float]:
    """Column -> value (a fraction, not %) of one eval.json."""
    metric, dataset = result["metric"], result["dataset"]
    if result["kind"] == "finetune":
        return {("finetune", dataset, None): result["test"][metric]}
    return {("probe", dataset, float(f)): found[metric] for f, found in result["fractions"].items()}


def _format(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _markdown(title: str, headers: Sequence[str], rows: dict[str, list[float | None]]) -> str:
    lines = [f"### {title}", "", "| Method | " + " | ".join(headers) + " |"]
    lines.append("|---|" + "---:|" * len(headers))
    lines += [f"| {label} | " + " | ".join(map(_format, v)) + " |" for label, v in rows.items()]
    return "\n".join(lines)


def _other_table(kind: str, columns: list[Column]) -> Table:
    """A table of results outside the paper's tables: each dataset at each fraction found."""
    datasets = tuple(dict.fromkeys((d, d) for _, d, _ in columns))
    fractions = tuple(sorted({f for _, _, f in columns}, key=lambda f: f or 0.0))
    name = "linear probes" if kind == "probe" else "full fine-tuning"
    return Table(f"Other {name} (AUROC %, ACC % for multiclass)", kind, datasets, fractions, {})


def render(results: Sequence[tuple[Path, dict[str, Any]]]) -> str:
    """The Markdown of Tables 1-3 (always) and of the other results (when there are any)."""
    runs: dict[str, dict[Column, float]] = {}
    origin: dict[tuple[str, Column], Path] = {}
    zero_shot = [r for _, r in results if r["kind"] == "zero_shot"]
    results = [(f, r) for f, r in results if r["kind"] != "zero_shot"]
    for file, result in results:
        label = row_label(result)
        for column, value in cells(result).items():
            if (label, column) in origin:
                print(
                    f"warning: {file} replaces {origin[label, column]} for {label}, {column}",
                    file=sys.stderr,
                )
            origin[label, column] = file
            runs.setdefault(label, {})[column] = value
    tables = list(PAPER_TABLES)
    placed = {c for table in PAPER_TABLES for c in table.columns}
    for kind in ("probe", "finetune"):
        other = sorted(
            {c for values in runs.values() for c in values if c[0] == kind} - placed,
            key=lambda c: (c[1], c[2] or 0.0),
        )
        if other:
            tables.append(_other_table(kind, other))
    blocks = []
    for table in tables:
        rows: dict[str, list[float | None]] = {k: list(v) for k, v in table.paper.items()}
        for label, values in sorted(runs.items()):
            found = [values.get(c) for c in table.columns]
            if any(v is not None for v in found):
                rows[label] = [None if v is None else 100.0 * v for v in found]
        blocks.append(_markdown(table.title, table.headers, rows))
    blocks += _zero_shot_blocks(zero_shot)
    return "\n\n".join(blocks) + "\n"


def _zero_shot_blocks(results: Sequence[dict[str, Any]]) -> list[str]:
    """A table per zero-shot benchmark with results: the published rows first, marked as
    reported in their (secondary) sources, then each run (CT-CLIP's protocol adds the mean
    AUROC's 95% bootstrap interval); below it the columns each published row fills and the
    sources with the line read."""
    blocks = []
    for table in ZERO_SHOT_TABLES:
        found = [r for r in results if r["benchmark"] == table.benchmark and table.section in r]
        if not found:
            continue
        headers = [title for _, title, _ in table.figures] + ["Source"]
        lines = [f"### {table.title}", "", "| Method | " + " | ".join(headers) + " |"]
        lines.append("|---|" + "---:|" * (len(headers) - 1) + "---|")
        published = table.published()
        rows = published.rows(table.published_table) if published else ()
        for row in rows:
            values = [
                100.0 * row.figures[key] if key in row.figures else None
                for _, _, key in table.figures
            ]
            mark = f"as reported in {', '.join(row.sources)} (secondary)"
            lines.append(f"| {row.method} | " + " | ".join(map(_format, values)) + f" | {mark} |")
        for result in found:
            figures = result[table.section]
            values = [
                100.0 * figures[key] if key in figures else None for key, _, _ in table.figures
            ]
            interval = figures.get("mean_auroc_ci")
            source = f"prompts {Path(result['prompts']).name}" + (
                f"; AUROC 95% CI {_format(100 * interval[0])}-{_format(100 * interval[1])}"
                if interval
                else ""
            )
            lines.append(
                f"| {row_label(result)} | " + " | ".join(map(_format, values)) + f" | {source} |"
            )
        lines += _published_notes(table, published, rows)
        blocks.append("\n".join(lines))
    return blocks


def _published_notes(
    table: ZeroShotTable, published: Published | None, rows: Sequence[Row]
) -> list[str]:
    """Below a table: what each published row fills and its sources, or why there is none."""
    if not rows:
        return ["", f"{table.unpublished or 'no published row'}."]
    titles = {key: title for _, title, key in table.figures if key}
    lines = ["", f"Published rows ({published.split}; {published.path.name}), each filling:"]
    lines += [
        f"- {row.method}: {', '.join(titles[k] for k in row.figures if k in titles)}"
        for row in rows
    ]
    lines += ["", f"Sources. {published.note}"]
    for key in dict.fromkeys(k for row in rows for k in row.sources):
        source = published.sources[key]
        lines.append(f"- {key}: {source.what}; {source.where}; line read: `{source.line}`")
    return lines


def tables_of(paths: Sequence[str | Path]) -> str:
    """The Markdown tables of every probe / fine-tuning eval.json at or under ``paths``."""
    results = find_results(paths)
    if not results:
        raise NoResultsError(
            f"no probe, fine-tuning or zero-shot eval.json under {', '.join(map(str, paths))}: "
            "give the folders that python -m unimedi_jax.evaluate (linear probe, zero-shot) or "
            "python -m unimedi_jax.finetune wrote, or their eval.json files."
        )
    return render(results)
