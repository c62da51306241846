"""TFDS builder for COVIDx CXR, three-class release: chest X-rays labelled normal, (non-COVID)
pneumonia or COVID-19 (2D, multiclass).

Task: 'multiclass', `label` an index into CLASS_NAMES (normal 0, pneumonia 1, COVID-19 2, the
order COVID-Net uses). The split files (`train_file`, `test_file`; default train.txt and
test.txt) hold one image per line, space-separated: `patient_id filename label source`. Only the
three-class label files are accepted (COVIDx 5 and earlier, 6, 7A, 8A, 9A, CXR-3A): the binary
ones (7B, 8B, 9B, CXR-2, CXR-3B, CXR-4: labels positive / negative) stop the build with an
error naming the file and line, as does any other label.

Splits (the paper's): 'test' is the official test file (images in test/); 'validation' is 10%
of the training patients (seeded, so no patient is in both), 'train' the rest (images in
train/). Patients are grouped by patient_id alone, across sources: ids that two sources share
then stay together, which can only keep more images out of a leak, never fewer.

Records: `image` uint8 letterboxed to `image_size`, `label`, `patient_id`, `source` and `id`
(the file name). Skipped per split and reason: missing image, unreadable file, too small,
constant image, path outside manual_dir (a file name that is absolute or whose `..` steps leave
the folder).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from data_pipelines import imaging
from data_pipelines.builders import common

VERSION = "1.0.0"
TASK = "multiclass"
CLASS_NAMES = ("normal", "pneumonia", "COVID-19")
OPTIONS = ("image_size", "train_file", "test_file", "seed", "num_workers")
_RECORDED = ("image_size", "train_file", "test_file", "seed")
HELD_OUT = {"validation": 0.1}
BINARY_LABELS = ("positive", "negative")
LAYOUT = (
    "the COVIDx CXR folder with the three-class split files (train.txt and test.txt, or e.g. "
    "train_COVIDx_CXR-3A.txt and test_COVIDx_CXR-3A.txt given as train_file and test_file; "
    "lines 'patient_id filename label source') and the images in train/ and test/"
)


@dataclasses.dataclass(kw_only=True)
class CovidxConfig(common.EvalImageConfig):
    """Stored size, which split files to read, validation seed, reader processes."""

    train_file: str = "train.txt"
    test_file: str = "test.txt"


@dataclasses.dataclass(frozen=True, slots=True)
class _Image:
    """One line of a split file, ready for a worker."""

    path: str
    filename: str
    patient_id: str
    source: str
    label: int
    image_size: int


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it has both image folders (else LayoutError); the split files, whose names
    are options, are checked when the build reads them."""
    root = Path(manual_dir)
    for name in ("train", "test"):
        common.require(root / name, root, LAYOUT)
    return root


def read_split_file(path: Path, folder: Path, image_size: int) -> list[_Image | common.Skip]:
    """The images a split file lists, in its order; a label outside the three classes (or a
    line that is not 'patient_id filename label source') is a LayoutError naming the line, a
    file name that leads out of manual_dir (the parent of `folder`) a Skip naming it."""
    index = {name.lower(): i for i, name in enumerate(CLASS_NAMES)}
    out: list[_Image | common.Skip] = []
    with common.utf8(path):
        text = path.read_text(encoding="utf-8")
    for line_number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 4:
            raise common.LayoutError(
                f"{path} line {line_number}: {line!r} is not 'patient_id filename label source'"
            )
        patient, filename, label, source = fields[0], " ".join(fields[1:-2]), *fields[-2:]
        if label.lower() not in index:
            binary = label.lower() in BINARY_LABELS
            raise common.LayoutError(
                f"{path} line {line_number}: label {label!r} is not one of {list(CLASS_NAMES)}"
                + (
                    "; this is a binary (COVID-19 positive/negative) COVIDx file: use the "
                    "three-class one (e.g. train_COVIDx_CXR-3A.txt, train_COVIDx8A.txt)"
                    if binary
                    else ""
                )
            )
        image = common.within(folder.parent, folder.name, filename)
        if image is None:
            where = f"{path} line {line_number}: filename {filename!r}"
            out.append(common.Skip(common.PATH_OUTSIDE, where))
            continue
        out.append(_Image(str(image), filename, patient, source, index[label.lower()], image_size))
    return out


def _load(image: _Image) -> dict | str:
    """The record of one image, or why it is skipped (runs in a worker)."""
    pixels = common.load_xray(image.path, image.image_size)
    if isinstance(pixels, str):
        return pixels
    return {
        "image": imaging.letterbox(pixels, image.image_size),
        "label": image.label,
        "patient_id": image.patient_id,
        "source": image.source,
        "id": image.filename,
    }


class Covidx(common.EvalBuilder):
    """COVIDx chest X-rays: normal, pneumonia or COVID-19."""

    RECORDED, CHUNKSIZE = _RECORDED, 16
    TEXT = ("patient_id", "source", "id")
    load = staticmethod(_load)

    def _inputs(self, root: Path) -> dict[str, list[_Image | common.Skip]]:
        cfg = self.builder_config
        check_manual_dir(root)
        files = {
            s: common.require(root / f, root, LAYOUT)
            for s, f in (("train", cfg.train_file), ("test", cfg.test_file))
        }
        train = read_split_file(files["train"], root / "train", cfg.image_size)
        images = [i for i in train if isinstance(i, _Image)]
        split_of = common.split_groups((i.patient_id for i in images), HELD_OUT, cfg.seed)
        return {
            "train": [
                i for i in train if not isinstance(i, _Image) or split_of[i.patient_id] == "train"
            ],
            "validation": [i for i in images if split_of[i.patient_id] == "validation"],
            "test": read_split_file(files["test"], root / "test", cfg.image_size),
        }


def make_builder(config_name: str, data_dir: str, **options: Any) -> Covidx:
    """A builder for config 'xray' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("covidx", options, OPTIONS)
    return common.array_record_builder(Covidx, CovidxConfig, config_name, data_dir, options)
