"""TFDS builder for RAD-ChestCT (Draelos et al. 2021, Zenodo record 6406114): chest CT volumes
with abnormality labels, the external set of the CT-RATE zero-shot benchmark (3D).

All volumes go to one split, 'test': the public release (3,630 volumes of the train part) is
scored whole as external validation, never trained on. `labels` holds the abnormalities that
RAD-ChestCT shares with CT-RATE's 18, under CT-RATE's names (so CT-CLIP's prompts read them):
a label is 1 when any location column of any of its RAD-ChestCT abnormalities is 1.

Release layout, as its documentation and preprocessing code give it: label tables
img{train,valid,test}_Abnormality_and_Location_Labels.csv with a `NoteAcc_DEID` column and one
0/1 column per `<abnormality>*<location>`; a volume per accession, `<NoteAcc_DEID>.npz`, array
`ct`: int16 HU clipped to [-1000, 1000], resampled to 0.8 mm, indexed [slice, row, column]
from axial DICOM slices of ImageOrientationPatient 1,0,0,0,1,0 stacked from the head down
(rachellea/ct-volume-preprocessing, preprocess_volumes.py). Volumes are canonicalised and
resized to `volume_shape` like every other volume. A listed accession without its .npz is
skipped as "missing volume".
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

VERSION = "1.0.0"
OPTIONS = ("volume_shape", "num_workers")
_RECORDED = ("volume_shape",)
# CT-RATE abnormality -> the RAD-ChestCT abnormalities that state it. Left out, for want of one
# clear counterpart: Medical material (a dozen device labels), the two calcifications (located
# 'calcification' and 'coronary_artery_disease' are not the same findings), Hiatal hernia (any
# 'hernia'), Mosaic attenuation pattern (none).
SHARED = {
    "Cardiomegaly": ("cardiomegaly",),
    "Pericardial effusion": ("pericardial_effusion",),
    "Lymphadenopathy": ("lymphadenopathy",),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis",),
    "Lung nodule": ("nodule", "nodulegr1cm"),
    "Lung opacity": ("opacity",),
    "Pulmonary fibrotic sequela": ("fibrosis",),
    "Pleural effusion": ("pleural_effusion",),
    "Peribronchial thickening": ("bronchial_wall_thickening",),
    "Consolidation": ("consolidation",),
    "Bronchiectasis": ("bronchiectasis",),
    "Interlobular septal thickening": ("septal_thickening",),
}
ABNORMALITIES = tuple(SHARED)
ACCESSION = "NoteAcc_DEID"
LABEL_TABLES = tuple(
    f"{part}_Abnormality_and_Location_Labels.csv" for part in ("imgtrain", "imgvalid", "imgtest")
)
# Array index [slice, row, column] -> RAS+ mm: slices head to feet, rows anterior to posterior,
# columns patient right to left, 0.8 mm apart.
AFFINE = np.array(
    [[0.0, 0.0, -0.8, 0.0], [0.0, -0.8, 0.0, 0.0], [-0.8, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
LAYOUT = (
    "the RAD-ChestCT folder with img{train,valid,test}_Abnormality_and_Location_Labels.csv (any "
    "of them; the public release has imgtrain) and the volumes <NoteAcc_DEID>.npz beside them "
    "or in one folder below"
)


@dataclasses.dataclass(kw_only=True)
class RadChestCtConfig(tfds.core.BuilderConfig):
    """Stored volume shape, reader processes."""

    volume_shape: tuple[int, int, int] = (32, 128, 128)
    num_workers: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Volume:
    """One accession with its .npz (None when absent) and its shared labels."""

    accession: str
    path: str | None
    labels: tuple[float, ...]
    volume_shape: tuple[int, int, int]


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it holds at least one label table (else LayoutError)."""
    root = Path(manual_dir)
    if not any((root / name).is_file() for name in LABEL_TABLES):
        common.require(root / LABEL_TABLES[0], root, LAYOUT)
    return root


def shared_labels(row: dict[str, str], columns: Sequence[str], table: Path) -> tuple[float, ...]:
    """A table row's 1/0 per shared abnormality: 1 when any of its location columns is 1."""
    out = []
    for name, tokens in SHARED.items():
        found = [c for c in columns if c.split("*", 1)[0] in tokens]
        if not found:
            raise common.LayoutError(
                f"{table} has no <abnormality>*<location> column of {' or '.join(tokens)} "
                f"(for {name}); expected {LAYOUT}"
            )
        out.append(float(any(common.parse_float(row[c]) == 1 for c in found)))
    return tuple(out)


def _volumes(root: Path, volume_shape: tuple[int, int, int]) -> list[_Volume]:
    """Every accession of the label tables present, in table order."""
    files = {p.stem: p for p in (*root.glob("*/*.npz"), *root.glob("*.npz"))}
    out = []
    for table in (root / name for name in LABEL_TABLES):
        if not table.is_file():
            continue
        rows = common.read_table(table, (ACCESSION,))
        for row in rows:
            columns = list(row)
            accession = row[ACCESSION].strip()
            path = files.get(accession)
            out.append(
                _Volume(
                    accession=accession,
                    path=str(path) if path else None,
                    labels=shared_labels(row, columns, table),
                    volume_shape=volume_shape,
                )
            )
    return out


def _load(item: _Volume) -> dict | str:
    """The record of one accession, or why it is skipped (runs in a worker)."""
    if item.path is None:
        return common.Skip(common.MISSING_VOLUME, f"{item.accession}.npz")
    try:
        with np.load(item.path) as npz:
            hu = np.asarray(npz["ct"], np.float32)
    except (OSError, ValueError, KeyError) as e:
        return common.Skip(imaging.UNREADABLE, f"{item.path} ({type(e).__name__}: {e})")
    try:
        stored = imaging.prepare_volume(imaging.Volume(hu, AFFINE, item.path), item.volume_shape)
    except imaging.SkipVolume as e:
        return common.Skip.of(e)
    return {
        "volume": stored,
        "labels": np.asarray(item.labels, np.float32),
        "id": item.accession,
    }


class RadChestCt(tfds.core.GeneratorBasedBuilder):
    """RAD-ChestCT chest CT volumes with the abnormality labels shared with CT-RATE."""

    name = "rad_chestct"
    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Point manual_dir at {LAYOUT} (see docs/data.md)."

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "volume": common.raw_array(self.builder_config.volume_shape, np.int16),
            "labels": tfds.features.Tensor(shape=(len(ABNORMALITIES),), dtype=np.float32),
            "id": tfds.features.Text(),
        }
        return common.dataset_info(self, __doc__, features, _RECORDED, labels=list(ABNORMALITIES))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        root = check_manual_dir(dl_manager.manual_dir)
        volumes = _volumes(root, tuple(self.builder_config.volume_shape))
        return {"test": self._generate_examples("test", volumes)}

    def _generate_examples(
        self, split: str, volumes: Sequence[_Volume]
    ) -> Iterator[tuple[int, dict]]:
        return common.generate(self, split, volumes, _load)


def make_builder(config_name: str, data_dir: str, **options: Any) -> RadChestCt:
    """A builder for config 'ct' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("rad_chestct", options, OPTIONS)
    return common.array_record_builder(RadChestCt, RadChestCtConfig, config_name, data_dir, options)
