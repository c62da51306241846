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

from data_pipelines import phantoms
from data_pipelines.reports import CleanReport, clean_report

VERSION = "1.0.0"
# The options each config records: the ones that change what it stores.
_RECORDED = {
    "xray": ("image_size", "num_train", "num_validation", "num_test", "seed"),
    "ct": ("volume_shape", "num_train", "num_validation", "num_test", "seed"),
}
OPTIONS = ("image_size", "volume_shape", "num_train", "num_validation", "num_test", "seed")


@dataclasses.dataclass(kw_only=True)
class PhantomsConfig(tfds.core.BuilderConfig):
    """Which modality and how much of it; defaults are the paper's stored sizes."""

    image_size: int = 256
    volume_shape: tuple[int, int, int] = (32, 128, 128)
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 200
    seed: int = 0

    def recorded_options(self) -> dict[str, Any]:
        """The options that define this config's data, JSON-ready."""
        values = dataclasses.asdict(self)
        return {k: _jsonable(values[k]) for k in _RECORDED[self.name]}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class Phantoms(tfds.core.GeneratorBasedBuilder):
    """Synthetic chest X-rays (2D) and CT volumes (3D) with reports and exact labels."""

    VERSION = tfds.core.Version(VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        raw = tfds.features.Encoding.BYTES
        if cfg.name == "xray":
            s = cfg.image_size
            arrays = {"image": tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding=raw)}
        else:
            d = cfg.volume_shape[0]
            arrays = {
                "volume": tfds.features.Tensor(
                    shape=tuple(cfg.volume_shape), dtype=np.int16, encoding=raw
                ),
                "lesion_slices": tfds.features.Tensor(shape=(d,), dtype=np.bool_, encoding=raw),
            }
        features = {
            **arrays,
            "report": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(len(phantoms.FINDINGS),), dtype=np.float32),
            "id": tfds.features.Text(),
        }
        metadata = tfds.core.MetadataDict(
            options=cfg.recorded_options(), findings=list(phantoms.FINDINGS), skipped={}
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(features),
            metadata=metadata,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        gen_cfg = phantoms.PhantomConfig(
            image_size=cfg.image_size,
            volume_shape=tuple(cfg.volume_shape),
            seed=cfg.seed,
            split=split,
        )
        make = phantoms.make_xray if cfg.name == "xray" else phantoms.make_ct
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
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"phantoms: unknown options {unknown}; valid: {list(OPTIONS)}")
    if "volume_shape" in options:
        options["volume_shape"] = tuple(int(n) for n in options["volume_shape"])
    # Fail here, with the generator's message, rather than inside a half-written build.
    phantoms.PhantomConfig(
        **{k: options[k] for k in ("image_size", "volume_shape", "seed") if k in options}
    )
    config = PhantomsConfig(name=config_name, version=VERSION, **options)
    return Phantoms(config=config, data_dir=data_dir, file_format="array_record")
