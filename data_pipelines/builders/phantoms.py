"""TFDS builder for the procedural chest phantoms: `phantoms/xray` (2D) and `phantoms/ct` (3D).

The phantoms are the embedded dataset of the demo and the tests, so they are stored exactly like
the real datasets (ArrayRecord, the same feature names) and read by the same pipeline. Arrays are
raw bytes, not PNG, so decoding a record is a memcpy. Record i of a split is sample i of the
generator (no shuffling on write), which makes records easy to check against the generator.

The sizes and split sizes are builder-config options; `metadata.json` records them so a later
request for other sizes is detected (see `data_pipelines.prepare.ensure_prepared`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import synthetic_phantoms
from data_pipelines.builders import common
from data_pipelines.reports import CleanReport, clean_report

VERSION = "1.0.0"
# Labelled like the evaluation sets, so a linear probe reads them the same way.
TASK = "multilabel"
CLASS_NAMES = synthetic_phantoms.FINDINGS
# The options each config records: the ones that change what it stores.
_RECORDED = {
    "xray": ("image_size", "lesions", "num_train", "num_validation", "num_test", "seed"),
    "ct": ("volume_shape", "lesions", "num_train", "num_validation", "num_test", "seed"),
}
OPTIONS = (
    "image_size",
    "volume_shape",
    "lesions",
    "num_train",
    "num_validation",
    "num_test",
    "seed",
)
# Options recorded since a later version of this builder: the value data built before had.
UNRECORDED_DEFAULTS = {"lesions": "lobar"}


@dataclasses.dataclass(kw_only=True)
class PhantomsConfig(tfds.core.BuilderConfig):
    """Which modality and how much of it; defaults are the paper's stored sizes."""

    image_size: int = 256
    volume_shape: tuple[int, int, int] = (32, 128, 128)
    lesions: str = "lobar"  # lung-lesion sizes (synthetic_phantoms.LESION_SIZES)
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 200
    seed: int = 0


class Phantoms(tfds.core.GeneratorBasedBuilder):
    """Synthetic chest X-rays (2D) and CT volumes (3D) with reports and exact labels."""

    VERSION = tfds.core.Version(VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if cfg.name == "xray":
            arrays = {"image": common.raw_array((cfg.image_size, cfg.image_size), np.uint8)}
        else:
            arrays = {
                "volume": common.raw_array(cfg.volume_shape, np.int16),
                "lesion_slices": common.raw_array((cfg.volume_shape[0],), np.bool_),
            }
        features = {
            **arrays,
            "report": tfds.features.Text(),
            "labels": tfds.features.Tensor(
                shape=(len(synthetic_phantoms.FINDINGS),), dtype=np.float32
            ),
            "id": tfds.features.Text(),
        }
        return common.dataset_info(
            self, __doc__, features, _RECORDED[cfg.name], findings=list(synthetic_phantoms.FINDINGS)
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        gen_cfg = synthetic_phantoms.PhantomConfig(
            image_size=cfg.image_size,
            volume_shape=tuple(cfg.volume_shape),
            lesions=cfg.lesions,
            seed=cfg.seed,
            split=split,
        )
        make = synthetic_phantoms.make_xray if cfg.name == "xray" else synthetic_phantoms.make_ct
        skipped: Counter[str] = Counter()
        for index in range(count):
            sample = make(index, gen_cfg)
            report = clean_report(sample["report"])
            if not isinstance(report, CleanReport):
                skipped[str(report)] += 1
                continue
            yield index, _record(cfg.name, split, index, sample, report.text)
        self.info.metadata["skipped"][split] = dict(skipped)


def _record(modality: str, split: str, index: int, sample: dict, report: str) -> dict:
    """The stored features of one generator sample."""
    arrays = (
        {"image": sample["image"]}
        if modality == "xray"
        else {"volume": sample["volume"], "lesion_slices": sample["lesion_slices"]}
    )
    return {
        **arrays,
        "report": report,
        "labels": sample["labels"],
        "id": f"{modality}-{split}-{index:06d}",
    }


def make_builder(config_name: str, data_dir: str, **options: Any) -> Phantoms:
    """A builder for `config_name` ('xray' or 'ct') with the given sizes (see OPTIONS)."""
    options = common.check_options("phantoms", options, OPTIONS)
    # Fail here, with the generator's message, rather than inside a half-written build.
    synthetic_phantoms.PhantomConfig(
        **{k: options[k] for k in ("image_size", "volume_shape", "lesions", "seed") if k in options}
    )
    return common.array_record_builder(Phantoms, PhantomsConfig, config_name, data_dir, options)
