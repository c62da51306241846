"""TFDS builder for the RSNA Pneumonia Detection Challenge (stage 2 train set): chest X-rays,
pneumonia or not, with the pneumonia boxes as a mask (2D, binary).

Task: 'binary', `label` 1 when the patient has a pneumonia box (Target 1), else 0 (Target 0
covers both "Normal" and "No Lung Opacity / Not Normal"); CLASS_NAMES gives the names of 0 and
1. One image per patient: `stage_2_train_labels.csv` has one row per box (x, y, width, height
of the top-left corner and size, in pixels of the DICOM) and one row with blank box cells for a
negative patient.

`mask` is the union of the patient's boxes, drawn at the DICOM's size and put through the same
letterbox as the image (area shrink), then thresholded at half cover: uint8 0/1 at
`image_size`, aligned with `image` pixel for pixel. `num_boxes` counts the boxes.

Splits: there are no labels for the stage 2 test images, so the train set is split 70/15/15
into train/validation/test by a seeded permutation of patients (the paper's protocol, after
MGCA); each image is one patient, so no patient is in two splits.

Records: `image` uint8 letterboxed to `image_size`, `label`, `mask`, `num_boxes`, `patient_id`
(the patientId) and `id` (the same). Skipped per split and reason: missing image, unreadable
file, unsupported image, too small, constant image, path outside manual_dir (a patientId that
would name a file outside the folder; counted under 'train').
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import imaging
from data_pipelines.builders import common

VERSION = "1.0.0"
TASK = "binary"
CLASS_NAMES = ("no pneumonia", "pneumonia")
OPTIONS = ("image_size", "seed", "num_workers")
_RECORDED = ("image_size", "seed")
HELD_OUT = {"validation": 0.15, "test": 0.15}
LABELS = "stage_2_train_labels.csv"
IMAGES = "stage_2_train_images"
BOX = ("x", "y", "width", "height")
LAYOUT = (
    f"the RSNA Pneumonia Detection Challenge files: {LABELS} (columns patientId, x, y, width, "
    f"height, Target) and {IMAGES}/<patientId>.dcm"
)


@dataclasses.dataclass(frozen=True, slots=True)
class _Patient:
    """One patient's image and boxes, ready for a worker."""

    patient_id: str
    path: str
    label: int
    boxes: tuple[tuple[float, float, float, float], ...]  # x, y, width, height
    image_size: int


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it has the labels CSV and the image folder (else LayoutError)."""
    root = Path(manual_dir)
    for name in (LABELS, IMAGES):
        common.require(root / name, root, LAYOUT)
    return root


def box_mask(shape: tuple[int, int], boxes: Any, image_size: int) -> np.ndarray:
    """uint8 0/1 [image_size, image_size]: the boxes drawn at `shape` (the DICOM's rows and
    columns), letterboxed as the image is, a pixel in when at least half of it is covered."""
    full = np.zeros(shape, np.uint8)
    for x, y, width, height in boxes:
        top, left = max(0, round(y)), max(0, round(x))
        full[top : max(top, round(y + height)), left : max(left, round(x + width))] = 255
    return (imaging.letterbox(full, image_size) >= 128).astype(np.uint8)


def _load(patient: _Patient) -> dict | str:
    """The record of one patient, or why it is skipped (runs in a worker)."""
    pixels = common.load_xray(patient.path, patient.image_size)
    if isinstance(pixels, str):
        return pixels
    return {
        "image": imaging.letterbox(pixels, patient.image_size),
        "mask": box_mask(pixels.shape, patient.boxes, patient.image_size),
        "num_boxes": len(patient.boxes),
        "label": patient.label,
        "patient_id": patient.patient_id,
        "id": patient.patient_id,
    }


class RsnaPneumonia(common.EvalBuilder):
    """RSNA Pneumonia X-rays: pneumonia or not, with box masks."""

    RECORDED, CHUNKSIZE = _RECORDED, 16
    load = staticmethod(_load)

    def _features(self) -> dict[str, Any]:
        size = self.builder_config.image_size
        return {
            "mask": common.raw_array((size, size), np.uint8),
            "num_boxes": tfds.features.Scalar(dtype=np.int32),
        }

    def _inputs(self, root: Path) -> dict[str, list[_Patient | common.Skip]]:
        cfg = self.builder_config
        listed = _patients(check_manual_dir(root), cfg.image_size)
        patients = [p for p in listed if isinstance(p, _Patient)]
        split_of = common.split_groups((p.patient_id for p in patients), HELD_OUT, cfg.seed)
        out = {
            split: [p for p in patients if split_of[p.patient_id] == split]
            for split in ("train", *HELD_OUT)
        }
        out["train"] += [p for p in listed if isinstance(p, common.Skip)]
        return out


def _patients(root: Path, image_size: int) -> list[_Patient | common.Skip]:
    """One entry per patientId of the labels CSV (first-row order), its boxes gathered; a Skip
    for a patientId whose file would lie outside `root`."""
    table = root / LABELS
    rows: dict[str, tuple[int, list]] = {}
    for line, row in enumerate(common.read_table(table, ("patientId", *BOX, "Target")), 2):
        patient, target = row["patientId"].strip(), row["Target"].strip()
        cells = [row[c].strip() for c in BOX]
        box = tuple(common.parse_float(c) for c in cells)
        positive = target == "1" and not np.isnan(box).any()
        if not (positive or (target == "0" and not any(cells))):
            raise common.LayoutError(
                f"{table} line {line}: Target {target!r} with x, y, width, height {cells}; "
                "expected Target 1 with four numbers, or Target 0 with the four blank"
            )
        label, boxes = rows.setdefault(patient, (int(target), []))
        if label != int(target):
            raise common.LayoutError(
                f"{table} line {line}: patient {patient} has rows with Target 0 and Target 1"
            )
        if positive:
            boxes.append(box)
    out: list[_Patient | common.Skip] = []
    for patient, (label, boxes) in rows.items():
        path = common.within(root, IMAGES, f"{patient}.dcm")
        out.append(
            common.Skip(common.PATH_OUTSIDE, f"{table}: patientId {patient!r}")
            if path is None
            else _Patient(patient, str(path), label, tuple(boxes), image_size)
        )
    return out


def make_builder(config_name: str, data_dir: str, **options: Any) -> RsnaPneumonia:
    """A builder for config 'xray' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("rsna_pneumonia", options, OPTIONS)
    return common.array_record_builder(
        RsnaPneumonia, common.EvalImageConfig, config_name, data_dir, options
    )
