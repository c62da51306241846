"""TFDS builder for CheXpert v1.0 (small or full size): frontal chest X-rays with the five
competition labels, for the linear probe of the paper's Table 1 (2D, multilabel).

Task: 'multilabel' over CLASS_NAMES (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural
Effusion); `labels` is a float32 multi-hot vector in that order. CheXpert's cells are 1.0
positive, 0.0 negative, -1.0 uncertain and blank (not mentioned). Blank is 0. Uncertain follows
the `uncertain` option: 'paper' (default) maps it to 1 for Atelectasis, Edema and Pleural
Effusion (U-ones) and to 0 for Cardiomegaly and Consolidation (U-zeros), the per-label policy of
the CheXpert paper that GLoRIA and MGCA (the paper's [14, 40]) use; 'ones' and 'zeros' map all
five one way; 'Atelectasis=1,Edema=0,...' sets named labels (the others keep 'paper').

Splits (the paper's, after MGCA): 'test' is the official valid.csv (expert labels); 'validation'
is held out of train.csv by patient, so no patient is in both: patients in a seeded order are
taken until they hold at least `num_validation` frontal images (5,000 by default, a few more
when the last patient has several); 'train' is the rest of train.csv.

Records: `image` uint8 letterboxed to `image_size` (as pre-training stores X-rays), `labels`,
`patient_id` (patient00001), `study_id` (study1), `view` (the AP/PA cell) and `id` (the Path
cell). Only frontal images are kept; skipped per split and reason: lateral view, missing image,
unreadable file, too small, constant image, path outside manual_dir (an absolute Path cell, or
one whose `..` steps leave the folder; counted under 'train' or 'test' by its CSV).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from data_pipelines import imaging
from data_pipelines.builders import common

VERSION = "1.0.0"
TASK = "multilabel"
CLASS_NAMES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
OPTIONS = ("image_size", "uncertain", "num_validation", "seed", "num_workers")
_RECORDED = ("image_size", "uncertain", "num_validation", "seed")
# Uncertain -> 1 (U-ones) or 0 (U-zeros), per label: the paper's (GLoRIA's, MGCA's) choice.
PAPER_UNCERTAIN = {
    "Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0,
    "Pleural Effusion": 1.0,
}  # fmt: skip
TABLES = {"train": "train.csv", "test": "valid.csv"}
COLUMNS = ("Path", "Frontal/Lateral", "AP/PA", *CLASS_NAMES)
LATERAL_VIEW = "lateral view"
LAYOUT = (
    "the CheXpert-v1.0-small (or CheXpert-v1.0) folder with train.csv, valid.csv (columns Path, "
    "Sex, Age, Frontal/Lateral, AP/PA and the 14 labels) and the images under "
    "train/patientNNNNN/studyN/ and valid/patientNNNNN/studyN/"
)


@dataclasses.dataclass(kw_only=True)
class ChexpertConfig(common.EvalImageConfig):
    """Stored size, uncertain-label policy, validation hold-out size and seed, reader processes."""

    uncertain: str = "paper"
    num_validation: int = 5000


@dataclasses.dataclass(frozen=True, slots=True)
class _Image:
    """One row of train.csv / valid.csv, ready for a worker."""

    path: str
    patient_id: str
    study_id: str
    frontal: bool
    view: str
    labels: tuple[float, ...]
    cell: str  # the Path cell, the record's id
    image_size: int


def uncertain_values(policy: str) -> tuple[float, ...]:
    """The value an uncertain (-1) cell takes, per label of CLASS_NAMES, for an `uncertain`
    option: 'paper', 'ones', 'zeros' or 'Name=0|1,...' (unnamed labels keep 'paper')."""
    values = dict(PAPER_UNCERTAIN)
    if policy in ("ones", "zeros"):
        values = dict.fromkeys(CLASS_NAMES, 1.0 if policy == "ones" else 0.0)
    elif policy != "paper":
        for item in policy.split(","):
            name, _, value = (part.strip() for part in item.partition("="))
            if name not in values or value not in ("0", "1"):
                raise ValueError(
                    f"chexpert: bad uncertain option {policy!r} at {item.strip()!r}: use 'paper', "
                    f"'ones', 'zeros' or NAME=0|1 items with NAME one of {list(CLASS_NAMES)}"
                )
            values[name] = float(value)
    return tuple(values[name] for name in CLASS_NAMES)


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it has both CSVs and image folders (else LayoutError)."""
    root = Path(manual_dir)
    for name in (*TABLES.values(), "train", "valid"):
        common.require(root / name, root, LAYOUT)
    return root


def _load(image: _Image) -> dict | str:
    """The record of one row, or why it is skipped (runs in a worker)."""
    if not image.frontal:
        return LATERAL_VIEW
    pixels = common.load_xray(image.path, image.image_size)
    if isinstance(pixels, str):
        return pixels
    return {
        "image": imaging.letterbox(pixels, image.image_size),
        "labels": np.asarray(image.labels, np.float32),
        "patient_id": image.patient_id,
        "study_id": image.study_id,
        "view": image.view,
        "id": image.cell,
    }


class Chexpert(common.EvalBuilder):
    """Frontal CheXpert X-rays with the five competition labels."""

    RECORDED, CHUNKSIZE = _RECORDED, 16
    TEXT = ("patient_id", "study_id", "view", "id")
    load = staticmethod(_load)

    def _inputs(self, root: Path) -> dict[str, list[_Image | common.Skip]]:
        cfg = self.builder_config
        check_manual_dir(root)
        uncertain = uncertain_values(cfg.uncertain)
        train, test = (_images(root, TABLES[s], uncertain, cfg.image_size) for s in TABLES)
        images = [i for i in train if isinstance(i, _Image)]
        held_out = _validation_patients(images, cfg.num_validation, cfg.seed)
        return {
            "train": [
                i for i in train if not isinstance(i, _Image) or i.patient_id not in held_out
            ],
            "validation": [i for i in images if i.patient_id in held_out],
            "test": test,
        }


def _images(
    root: Path, table: str, uncertain: tuple[float, ...], image_size: int
) -> list[_Image | common.Skip]:
    """Every row of `table`, in its order, with its five labels mapped; a Skip for a Path cell
    that leads out of `root`."""
    out: list[_Image | common.Skip] = []
    for line, row in enumerate(common.read_table(root / table, COLUMNS), start=2):
        cell = row["Path"].strip()
        parts = PurePosixPath(cell).parts
        if parts and parts[0] not in ("train", "valid", "/"):
            parts = parts[1:]  # CheXpert-v1.0-small/train/... -> train/...
        path = common.within(root, *parts)
        if path is None:
            where = f"{root / table} line {line}: Path {cell!r}"
            out.append(common.Skip(common.PATH_OUTSIDE, where))
            continue
        if len(parts) != 4 or not parts[1].startswith("patient"):
            raise common.LayoutError(
                f"{root / table} line {line}: Path {cell!r} is not "
                "[CheXpert-v1.0-small/]train|valid/patientNNNNN/studyN/FILE"
            )
        labels = tuple(
            _label(row[name], u, f"{root / table} line {line}, column {name}")
            for name, u in zip(CLASS_NAMES, uncertain, strict=True)
        )
        out.append(
            _Image(
                path=str(path),
                patient_id=parts[1],
                study_id=parts[2],
                frontal=row["Frontal/Lateral"].strip() == "Frontal",
                view=row["AP/PA"].strip(),
                labels=labels,
                cell=cell,
                image_size=image_size,
            )
        )
    return out


def _label(cell: str, uncertain: float, where: str) -> float:
    """1 positive, 0 negative or blank, `uncertain` for -1; anything else names its cell."""
    value = common.parse_float(cell) if cell.strip() else 0.0
    if value not in (1.0, 0.0, -1.0):  # NaN (an unparseable cell) is not either
        raise common.LayoutError(f"{where}: {cell!r} is not 1.0, 0.0, -1.0 or blank")
    return uncertain if value == -1.0 else value


def _validation_patients(images: list[_Image], count: int, seed: int) -> set[str]:
    """Patients in seeded order until they hold at least `count` frontal images."""
    frontal = Counter(i.patient_id for i in images if i.frontal)
    total = sum(frontal.values())
    if not 0 < count < total:
        raise ValueError(
            f"chexpert: num_validation={count} must be at least 1 and below {total}, the "
            "frontal images of train.csv"
        )
    chosen, held = set(), 0
    for patient in common.seeded_order(frontal, seed):
        if held >= count:
            break
        chosen.add(patient)
        held += frontal[patient]
    return chosen


def make_builder(config_name: str, data_dir: str, **options: Any) -> Chexpert:
    """A builder for config 'xray' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("chexpert", options, OPTIONS)
    uncertain_values(options.get("uncertain", "paper"))  # fail before building
    return common.array_record_builder(Chexpert, ChexpertConfig, config_name, data_dir, options)
