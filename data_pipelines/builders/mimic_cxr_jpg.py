"""TFDS builder for MIMIC-CXR-JPG 2.0.0: frontal chest X-rays with their reports (2D).

One record per frontal image (ViewPosition PA or AP), as the paper keeps only frontal views.
The image is letterboxed to `image_size` (uint8, raw bytes), the report is the cleaned FINDINGS +
IMPRESSION text of its study (kept with at least three sentences), and `labels` holds the 14
CheXpert labels of the study as float32: 1 positive, 0 negative, -1 uncertain, NaN not mentioned
(or a study without a CheXpert row). Splits are the official ones; 'validate' is 'validation'.

Skipped images are counted per split and reason: lateral view, other view (no PA/AP position),
missing/short/empty report, unreadable report (not UTF-8), missing image, unreadable file, too
small, constant image, and path outside manual_dir (a metadata row whose ids would lead out of
the folder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import imaging
from data_pipelines.builders import common
from data_pipelines.reports import CleanReport, read_mimic_report

VERSION = "1.0.0"
OPTIONS = ("image_size", "num_workers")
_RECORDED = ("image_size",)

METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)  # fmt: skip
FRONTAL = ("PA", "AP")
SPLITS = {"train": "train", "validate": "validation", "test": "test"}
LATERAL_VIEW = "lateral view"
OTHER_VIEW = "other view"
NOT_IN_SPLIT_FILE = "not in split file"

LAYOUT = (
    "the MIMIC-CXR-JPG 2.0.0 root with files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg, the "
    "MIMIC-CXR reports unpacked into the same tree (files/pXX/pNNNNNNNN/sNNNNNNNN.txt), "
    f"{METADATA}, {SPLIT} and {CHEXPERT}"
)


@dataclasses.dataclass(kw_only=True)
class MimicConfig(tfds.core.BuilderConfig):
    """Stored image size and how many processes read the JPEGs."""

    image_size: int = 256
    num_workers: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Image:
    """One metadata row, with what is needed to read it in a worker."""

    dicom_id: str
    subject_id: str
    study_id: str
    view: str
    image: str  # files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg under the root
    report: str  # files/pXX/pNNNNNNNN/sNNNNNNNN.txt under the root
    labels: tuple[float, ...]
    image_size: int


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it has the files and folders the build reads (else LayoutError)."""
    root = Path(manual_dir)
    for name in ("files", METADATA, SPLIT, CHEXPERT):
        common.require(root / name, root, LAYOUT)
    return root


class MimicCxrJpg(tfds.core.GeneratorBasedBuilder):
    """Frontal MIMIC-CXR-JPG chest X-rays with cleaned reports and CheXpert labels."""

    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Point manual_dir at {LAYOUT} (see docs/data.md)."

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features = {
            "image": common.raw_array((cfg.image_size, cfg.image_size), np.uint8),
            **common.report_features(len(CHEXPERT_LABELS)),
            "view": tfds.features.Text(),
            "subject_id": tfds.features.Text(),
            "study_id": tfds.features.Text(),
            "dicom_id": tfds.features.Text(),
            "id": tfds.features.Text(),
        }
        return common.dataset_info(self, __doc__, features, _RECORDED, labels=list(CHEXPERT_LABELS))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        root = check_manual_dir(dl_manager.manual_dir)
        by_split, unsplit = _images_by_split(root, self.builder_config.image_size)
        if unsplit:
            self.info.metadata["skipped"]["none"] = {NOT_IN_SPLIT_FILE: unsplit}
        return {
            split: self._generate_examples(split, by_split.get(split, []))
            for split in SPLITS.values()
        }

    def _generate_examples(
        self, split: str, images: Sequence[_Image | common.Skip]
    ) -> Iterator[tuple[int, dict]]:
        return common.generate(self, split, images, _load, chunksize=16)


def _images_by_split(
    root: Path, image_size: int
) -> tuple[dict[str, list[_Image | common.Skip]], int]:
    """Metadata rows grouped by official split (file order), and how many had no split; a row
    whose ids lead out of `root` is a Skip naming its line."""
    split_of = {
        row["dicom_id"]: SPLITS.get(row["split"], row["split"])
        for row in common.read_table(root / SPLIT, ("dicom_id", "split"))
    }
    labels = _chexpert(root / CHEXPERT)
    missing_labels = (float("nan"),) * len(CHEXPERT_LABELS)
    columns = ("dicom_id", "subject_id", "study_id", "ViewPosition")
    by_split: dict[str, list[_Image | common.Skip]] = {}
    unsplit = 0
    for line, row in enumerate(common.read_table(root / METADATA, columns), start=2):
        split = split_of.get(row["dicom_id"])
        if split is None:
            unsplit += 1
            continue
        subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
        study_dir = ("files", f"p{subject[:2]}", f"p{subject}")
        image = common.within(root, *study_dir, f"s{study}", f"{dicom}.jpg")
        report = common.within(root, *study_dir, f"s{study}.txt")
        if image is None or report is None:
            where = f"{root / METADATA} line {line}: subject_id, study_id, dicom_id"
            item = common.Skip(common.PATH_OUTSIDE, f"{where} {subject!r}, {study!r}, {dicom!r}")
        else:
            item = _Image(
                dicom_id=dicom,
                subject_id=subject,
                study_id=study,
                view=row["ViewPosition"].strip(),
                image=str(image),
                report=str(report),
                labels=labels.get((subject, study), missing_labels),
                image_size=image_size,
            )
        by_split.setdefault(split, []).append(item)
    return by_split, unsplit


def _chexpert(path: Path) -> dict[tuple[str, str], tuple[float, ...]]:
    """(subject_id, study_id) -> the 14 labels, blank cells as NaN."""
    rows = common.read_table(path, ("subject_id", "study_id", *CHEXPERT_LABELS))
    return {
        (row["subject_id"], row["study_id"]): tuple(
            common.parse_float(row[name]) for name in CHEXPERT_LABELS
        )
        for row in rows
    }


def view_skip(view: str) -> str | None:
    """None for a frontal view; else why the image is skipped."""
    if view in FRONTAL:
        return None
    return LATERAL_VIEW if view == "LL" or "LATERAL" in view else OTHER_VIEW


def _load(image: _Image) -> dict | str:
    """The record of one image, or the reason it is skipped (runs in a worker)."""
    skip = view_skip(image.view)
    if skip:
        return skip
    try:
        report = read_mimic_report(image.report)
    except (OSError, UnicodeDecodeError) as e:  # a latin-1 file, a folder, no permission
        return common.Skip(common.UNREADABLE_REPORT, f"{image.report} ({e})")
    if not isinstance(report, CleanReport):
        return str(report)
    pixels = common.load_xray(image.image, image.image_size)
    if isinstance(pixels, str):
        return pixels
    return {
        "image": imaging.letterbox(pixels, image.image_size),
        "report": report.text,
        "num_sentences": len(report.sentences),
        "labels": np.asarray(image.labels, np.float32),
        "view": image.view,
        "subject_id": image.subject_id,
        "study_id": image.study_id,
        "dicom_id": image.dicom_id,
        "id": image.dicom_id,
    }


def make_builder(config_name: str, data_dir: str, **options: Any) -> MimicCxrJpg:
    """A builder for config 'xray' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("mimic_cxr_jpg", options, OPTIONS)
    return common.array_record_builder(MimicCxrJpg, MimicConfig, config_name, data_dir, options)
