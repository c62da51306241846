"""TFDS builders that write ArrayRecord files, and the registry that names them.

A dataset name (`phantoms`, `mimic_cxr_jpg`, `bimcv_covid19`, `ct_rate`, the external test set
`rad_chestct`, and the labelled evaluation sets `chexpert`, `rsna_pneumonia`, `covidx`,
`cc_ccii`, `luna16`) maps to a builder module and to the builder config that holds each
modality, so `config.data.sources_2d = "phantoms"` reads `phantoms/xray` and `sources_3d =
"phantoms"` reads `phantoms/ct`. A new
dataset slots in with one `DatasetSpec` entry and a module that defines `VERSION`, `OPTIONS` and
`make_builder(config_name, data_dir, **options)`; a dataset built from downloaded files also
defines `check_manual_dir(manual_dir)`, which raises naming what is missing from the expected
layout before anything is built.

Prepared data lives at `<data_dir>/<name>/<config>/<VERSION>/`: the ArrayRecord shards,
TFDS's `dataset_info.json` / `features.json` (array shapes) and `metadata.json` (`options`: the
sizes it was built with; `skipped`: inputs dropped per split and reason).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from unimedi_jax.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A dataset `prepare` can build and the pipeline can read."""

    name: str
    module: str  # defines VERSION, OPTIONS and make_builder(config_name, data_dir, **options)
    modalities: Mapping[str, str]  # "2d" / "3d" -> the builder config holding that modality
    description: str
    needs_manual_dir: bool = False

    @property
    def configs(self) -> tuple[str, ...]:
        return tuple(self.modalities.values())

    def load(self) -> ModuleType:
        """The builder module (imported on demand: real-data builders pull in heavy readers)."""
        return importlib.import_module(self.module)


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="phantoms",
            module="data_pipelines.builders.phantoms",
            modalities={"2d": "xray", "3d": "ct"},
            description="synthetic chest X-rays and CT volumes with reports (no download)",
        ),
        DatasetSpec(
            name="mimic_cxr_jpg",
            module="data_pipelines.builders.mimic_cxr_jpg",
            modalities={"2d": "xray"},
            description="MIMIC-CXR-JPG 2.0.0 frontal chest X-rays with reports (PhysioNet)",
            needs_manual_dir=True,
        ),
        DatasetSpec(
            name="bimcv_covid19",
            module="data_pipelines.builders.bimcv_covid19",
            modalities={"3d": "ct"},
            description="BIMCV-COVID19+ chest CT with Spanish reports (BIMCV)",
            needs_manual_dir=True,
        ),
        DatasetSpec(
            name="ct_rate",
            module="data_pipelines.builders.ct_rate",
            modalities={"3d": "ct"},
            description="CT-RATE chest CT with English reports and 18 labels (Hugging Face)",
            needs_manual_dir=True,
        ),
        DatasetSpec(
            name="rad_chestct",
            module="data_pipelines.builders.rad_chestct",
            modalities={"3d": "ct"},
            description="RAD-ChestCT chest CT, labels shared with CT-RATE, one test split (Zenodo)",
            needs_manual_dir=True,
        ),
        # Labelled evaluation datasets (modules define TASK and CLASS_NAMES; no reports).
        DatasetSpec(
            name="chexpert",
            module="data_pipelines.builders.chexpert",
            modalities={"2d": "xray"},
            description="CheXpert frontal X-rays, 5 competition labels (multilabel)",
            needs_manual_dir=True,
        ),
        DatasetSpec(
            name="rsna_pneumonia",
            module="data_pipelines.builders.rsna_pneumonia",
            modalities={"2d": "xray"},
            description="RSNA Pneumonia stage 2 X-rays, pneumonia or not, box masks (binary)",
            needs_manual_dir=True,
        ),
        DatasetSpec(
            name="covidx",
            module="data_pipelines.builders.covidx",
            modalities={"2d": "xray"},
            description="COVIDx X-rays: normal, pneumonia, COVID-19 (multiclass)",
            needs_manual_dir=True,
        ),
        DatasetSpec(
            name="cc_ccii",
            module="data_pipelines.builders.cc_ccii",
            modalities={"3d": "ct"},
            description="CC-CCII CT slice stacks: NCP, CP, Normal (multiclass)",
            needs_manual_dir=True,
        ),
        DatasetSpec(
            name="luna16",
            module="data_pipelines.builders.luna16",
            modalities={"3d": "ct"},
            description="LUNA16 CT crops around nodule candidates: nodule or not (binary)",
            needs_manual_dir=True,
        ),
    )
}


class UnknownDatasetError(UserError, ValueError):
    """A dataset name that is not in the registry."""


def valid_names() -> list[str]:
    """Every accepted name: `NAME` (all its configs) and `NAME/CONFIG`."""
    names = []
    for spec in REGISTRY.values():
        names += [spec.name, *(f"{spec.name}/{c}" for c in spec.configs)]
    return names


def parse_name(name: str) -> tuple[DatasetSpec, tuple[str, ...]]:
    """`phantoms` -> (spec, all configs); `phantoms/ct` -> (spec, ('ct',))."""
    base, _, config = name.strip().partition("/")
    spec = REGISTRY.get(base)
    if spec is None or (config and config not in spec.configs):
        raise UnknownDatasetError(f"unknown dataset {name!r}; valid names: {valid_names()}")
    return spec, (config,) if config else spec.configs


def resolve(name: str, modality: str | None = None) -> tuple[DatasetSpec, str, str]:
    """(spec, config, modality) of a `sources_2d` / `sources_3d` entry or an eval name.

    `modality` may be left out when the name says it: `phantoms/ct`, or a one-modality dataset.
    """
    spec, configs = parse_name(name)
    by_config = {c: m for m, c in spec.modalities.items()}
    if modality is None and len(configs) == 1:
        modality = by_config[configs[0]]
    config = spec.modalities.get(modality) if modality else None
    if config is None or ("/" in name and configs != (config,)):
        have = ", ".join(f"{m}: {spec.name}/{c}" for m, c in spec.modalities.items())
        wanted = f"no {modality} data" if modality else "several modalities: say which"
        raise ValueError(f"dataset {name!r} holds {wanted} ({have})")
    return spec, config, modality


def prepared_dir(data_dir: str | Path, spec: DatasetSpec, config: str) -> Path:
    """Where `config` of `spec` is (or would be) prepared under `data_dir`."""
    return Path(data_dir) / spec.name / config / spec.load().VERSION


def is_prepared(path: Path) -> bool:
    """True once TFDS has finished writing `path` (it writes into a temporary dir, then renames)."""
    return (path / "dataset_info.json").is_file()


def read_metadata(path: Path) -> dict[str, Any]:
    """`metadata.json` of a prepared dataset: {'options': {...}, 'skipped': {...}, ...}."""
    file = path / "metadata.json"
    if not file.is_file():
        return {}
    return json.loads(file.read_text())
