"""TFDS builder for CT-RATE: non-contrast chest CT reconstructions with English reports (3D).

One record per reconstruction listed in the reports CSVs (`train_1_a_1`, `train_1_a_2`, ...:
reconstructions of one scan share a report), canonicalised and resized to `volume_shape` as
int16 HU. The report is Findings_EN + Impressions_EN, kept with at least three sentences;
`labels` holds the 18 multi-abnormality labels (0/1 as float32; NaN when the volume has no row).

HU: CT-RATE's first release stores the raw DICOM values with an identity NIfTI scaling, and the
metadata CSV gives RescaleSlope/RescaleIntercept; a NIfTI whose header carries a scaling is
already in HU (nibabel applies it) and the metadata is not applied again. A volume whose median
is then outside [-1500, 500] HU is skipped ("implausible HU"): a rescale applied twice or not
at all shows up there.

Splits: CT-RATE's train set is 'train' minus a seeded 5% of its patients, which form
'validation'; its valid set is 'test'. Skipped inputs are counted per split and reason; a
VolumeName that is absolute or climbs out of the folder is "path outside manual_dir".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import imaging
from data_pipelines.builders import common
from data_pipelines.reports import CleanReport, ReportResult, read_ct_rate_reports

VERSION = "1.0.0"
OPTIONS = ("volume_shape", "seed", "num_workers")
_RECORDED = ("volume_shape", "seed")
HELD_OUT = {"validation": 0.05}
ABNORMALITIES = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
    "Pleural effusion", "Mosaic attenuation pattern", "Peribronchial thickening",
    "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)  # fmt: skip
PLAUSIBLE_MEDIAN_HU = (-1500.0, 500.0)
MISSING_RESCALE = "missing rescale"
IMPLAUSIBLE_HU = "implausible HU"


@dataclasses.dataclass(frozen=True)
class _Part:
    """One part of the release: its volume folder and its three CSVs."""

    folder: str  # under dataset/
    reports: str
    metadata: str
    labels: str


PARTS = {
    "train": _Part(
        "train", "train_reports.csv", "train_metadata.csv", "train_predicted_labels.csv"
    ),
    "valid": _Part(
        "valid", "validation_reports.csv", "validation_metadata.csv", "valid_predicted_labels.csv"
    ),
}
_FOLDERS = {
    "reports": "radiology_text_reports",
    "metadata": "metadata",
    "labels": "multi_abnormality_labels",
}
LAYOUT = (
    "the CT-RATE root with dataset/train/train_N/train_N_a/train_N_a_1.nii.gz (and "
    "dataset/valid/...), radiology_text_reports/{train,validation}_reports.csv, "
    "metadata/{train,validation}_metadata.csv and "
    "multi_abnormality_labels/{train,valid}_predicted_labels.csv (these three folders either "
    "next to dataset/ or inside it)"
)


@dataclasses.dataclass(kw_only=True)
class CtRateConfig(tfds.core.BuilderConfig):
    """Stored volume shape, validation hold-out seed, reader processes."""

    volume_shape: tuple[int, int, int] = (32, 128, 128)
    seed: int = 0
    num_workers: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Volume:
    """One reconstruction with its report, rescale and labels, ready for a worker."""

    name: str  # VolumeName without .nii.gz
    path: str
    report: ReportResult
    rescale: tuple[float, float]  # slope, intercept; NaN when the metadata lacks them
    labels: tuple[float, ...]
    volume_shape: tuple[int, int, int]

    @property
    def patient(self) -> str:
        return "_".join(self.name.split("_")[:2])


def _table(root: Path, kind: str, part: _Part) -> Path:
    """Where a CSV of the release is: <root>/<folder>/ or <root>/dataset/<folder>/."""
    relative = Path(_FOLDERS[kind], getattr(part, kind))
    for base in (root, root / "dataset"):
        if (base / relative).is_file():
            return base / relative
    return common.require(root / relative, root, LAYOUT)


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it has both parts' volume folders and CSVs (else LayoutError)."""
    root = Path(manual_dir)
    for part in PARTS.values():
        common.require(root / "dataset" / part.folder, root, LAYOUT)
        for kind in _FOLDERS:
            _table(root, kind, part)
    return root


class CtRate(tfds.core.GeneratorBasedBuilder):
    """CT-RATE chest CT volumes with reports and 18 abnormality labels."""

    name = "ct_rate"
    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Point manual_dir at {LAYOUT} (see docs/data.md)."

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "volume": common.raw_array(self.builder_config.volume_shape, np.int16),
            **common.report_features(len(ABNORMALITIES)),
            "patient_id": tfds.features.Text(),
            "id": tfds.features.Text(),
        }
        return common.dataset_info(self, __doc__, features, _RECORDED, labels=list(ABNORMALITIES))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        cfg = self.builder_config
        root = check_manual_dir(dl_manager.manual_dir)
        train = _volumes(root, PARTS["train"], cfg.volume_shape)
        volumes = [v for v in train if isinstance(v, _Volume)]
        split_of = common.split_groups({v.patient for v in volumes}, HELD_OUT, cfg.seed)
        by_split = {
            split: [v for v in volumes if split_of[v.patient] == split]
            for split in ("train", *HELD_OUT)
        }
        by_split["train"] += [v for v in train if isinstance(v, common.Skip)]
        by_split["test"] = _volumes(root, PARTS["valid"], cfg.volume_shape)
        return {split: self._generate_examples(split, tasks) for split, tasks in by_split.items()}

    def _generate_examples(
        self, split: str, volumes: Sequence[_Volume | common.Skip]
    ) -> Iterator[tuple[int, dict]]:
        return common.generate(self, split, volumes, _load)


def _volumes(
    root: Path, part: _Part, volume_shape: tuple[int, int, int]
) -> list[_Volume | common.Skip]:
    """Every reconstruction of the part's reports CSV, in its order; a Skip for a VolumeName
    that leads out of `root`."""
    table = _table(root, "reports", part)
    with common.utf8(table):
        reports = read_ct_rate_reports(table)
    metadata = {
        row["VolumeName"].strip(): row
        for row in common.read_table(
            _table(root, "metadata", part), ("VolumeName", "RescaleSlope", "RescaleIntercept")
        )
    }
    labels = {
        row["VolumeName"].strip(): tuple(common.parse_float(row[c]) for c in ABNORMALITIES)
        for row in common.read_table(_table(root, "labels", part), ("VolumeName", *ABNORMALITIES))
    }
    missing_labels = (math.nan,) * len(ABNORMALITIES)
    out: list[_Volume | common.Skip] = []
    for file_name, report in reports.items():
        name = file_name.removesuffix(".nii.gz")
        path = _volume_path(root, part, name)
        if path is None:
            out.append(common.Skip(common.PATH_OUTSIDE, f"{table}: VolumeName {file_name!r}"))
            continue
        row = metadata.get(file_name, {})
        out.append(
            _Volume(
                name=name,
                path=str(path),
                report=report,
                rescale=(
                    common.parse_float(row.get("RescaleSlope")),
                    common.parse_float(row.get("RescaleIntercept")),
                ),
                labels=labels.get(file_name, missing_labels),
                volume_shape=volume_shape,
            )
        )
    return out


def _volume_path(root: Path, part: _Part, name: str) -> Path | None:
    """train_12_a_1 -> dataset/train/train_12/train_12_a/train_12_a_1.nii.gz; None when the
    name leads out of `root` (see `common.within`)."""
    patient_scan = name.rsplit("_", 1)[0]
    patient = patient_scan.rsplit("_", 1)[0]
    return common.within(root, "dataset", part.folder, patient, patient_scan, f"{name}.nii.gz")


def to_hu(path: str, rescale: tuple[float, float]) -> imaging.Volume:
    """Read a CT-RATE NIfTI in HU: the metadata rescale, unless the header holds a scaling.

    Raises SkipVolume ("unreadable file", "missing rescale").
    """
    volume = imaging.read_nifti(path)
    proxy = nib.load(path).dataobj
    if (float(proxy.slope), float(proxy.inter)) != (1.0, 0.0):
        return volume  # nibabel applied the header's scaling
    slope, intercept = rescale
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise imaging.SkipVolume(MISSING_RESCALE, path, "no RescaleSlope/Intercept in metadata")
    hu = volume.hu * np.float32(slope) + np.float32(intercept)
    return imaging.Volume(hu, volume.affine, volume.path)


def _load(item: _Volume) -> dict | str:
    """The record of one reconstruction, or why it is skipped (runs in a worker)."""
    if not isinstance(item.report, CleanReport):
        return str(item.report)
    if not Path(item.path).is_file():
        return common.Skip(common.MISSING_VOLUME, item.path)
    try:
        volume = to_hu(item.path, item.rescale)
        stored = imaging.prepare_volume(volume, item.volume_shape)
    except imaging.SkipVolume as e:
        return common.Skip.of(e)
    low, high = PLAUSIBLE_MEDIAN_HU
    median = float(np.median(stored))
    if not low <= median <= high:
        return common.Skip(IMPLAUSIBLE_HU, f"{item.path} (median {median:g} HU)")
    return {
        "volume": stored,
        "report": item.report.text,
        "num_sentences": len(item.report.sentences),
        "labels": np.asarray(item.labels, np.float32),
        "patient_id": item.patient,
        "id": item.name,
    }


def make_builder(config_name: str, data_dir: str, **options: Any) -> CtRate:
    """A builder for config 'ct' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("ct_rate", options, OPTIONS)
    return common.array_record_builder(CtRate, CtRateConfig, config_name, data_dir, options)
