"""Prepared splits as the pipelines read them: which split a config's source names, opened,
and checked against the model's sizes (``open_for_model``: the one such check, for training,
evaluation, probes and fine-tuning alike); and the training reports a vocabulary is built from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import builders
from unimedi_jax.core.errors import UserError

ARRAY_KEY = {"2d": "image", "3d": "volume"}  # the record field of each modality's array


class DataConfigError(UserError, ValueError):
    """The data part of a config does not match what is prepared on disk."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One prepared split of one dataset config, as the pipeline reads it."""

    name: str  # NAME/CONFIG
    path: Path
    split: str
    size: int
    array_shape: tuple[int, ...]
    array_dtype: np.dtype
    weight: float = 1.0
    fields: tuple[str, ...] = ()  # what its records hold (the phantoms: lesion_slices too)

    def open(self) -> Sequence[dict]:
        """TFDS's random-access reader of the split: index -> decoded numpy dict."""
        return tfds.builder_from_directory(self.path).as_data_source(self.split)


def parse_sources(text: str) -> list[tuple[str, float]]:
    """'a:2, b' -> [('a', 2.0), ('b', 1.0)]; '' -> []."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise DataConfigError(f"bad weight in data source {item!r}: use NAME:WEIGHT") from None
        if value <= 0:
            raise DataConfigError(f"data source {item!r} needs a positive weight")
        out.append((name.strip(), value))
    return out


def open_source(
    name: str,
    data_dir: str | Path,
    modality: str | None = None,
    split: str = "train",
    weight: float = 1.0,
) -> Source:
    """Find the prepared split that a `sources_2d` / `sources_3d` entry names."""
    spec, config, modality = builders.resolve(name, modality)
    path = builders.prepared_dir(data_dir, spec, config)
    if not builders.is_prepared(path):
        raw = " --manual_dir=RAW_DIR (the files as downloaded, docs/data.md)"
        raise DataConfigError(
            f"{spec.name}/{config} is not prepared in {data_dir} (config.data.data_dir): run "
            f"python -m data_pipelines.prepare {spec.name} --data_dir={data_dir}"
            f"{raw if spec.needs_manual_dir else ''}, or point config.data.data_dir at where "
            "it was prepared"
        )
    info = tfds.builder_from_directory(path).info
    if split not in info.splits:
        raise DataConfigError(f"{path} has no split {split!r}; it has {list(info.splits)}")
    feature = info.features[ARRAY_KEY[modality]]
    return Source(
        name=f"{spec.name}/{config}",
        path=path,
        split=split,
        size=info.splits[split].num_examples,
        array_shape=tuple(feature.shape),
        array_dtype=np.dtype(feature.np_dtype),
        weight=weight,
        fields=tuple(info.features.keys()),
    )


def open_for_model(
    name: str,
    data_dir: str | Path,
    modality: str,
    split: str,
    image_size: Sequence[int],
    volume_size: Sequence[int],
    *,
    weight: float = 1.0,
    checkpoint: str | Path | None = None,
) -> Source:
    """`open_source`, then check that the stored arrays fit the model: X-rays at least the crop
    (`image_size`), volumes exactly `volume_size`. The one check of prepared data against a model,
    for training, evaluation, probes and fine-tuning alike.

    `checkpoint` names a trained model whose sizes are fixed (its config.json's model.*); without
    it the sizes are config.model's, which the message also offers to change.
    """
    source = open_source(name, data_dir, modality, split, weight)
    image_size, volume_size = tuple(int(n) for n in image_size), tuple(int(n) for n in volume_size)

    def field(key: str, value: tuple[int, ...]) -> str:
        if checkpoint is None:
            return f"config.model.{key}={value}"
        return f"model.{key}={value} of checkpoint {checkpoint} (its config.json)"

    again = "into another data_dir and point config.data.data_dir there"
    stored = source.array_shape
    if modality == "2d" and min(stored) < max(image_size):
        lower = ", or lower config.model.image_size" if checkpoint is None else ""
        raise DataConfigError(
            f"{field('image_size', image_size)} is larger than the stored X-rays of "
            f"{source.name} ({stored} in {source.path}): prepare it with "
            f"--image_size>={max(image_size)} {again}{lower}"
        )
    if modality == "3d" and stored != volume_size:
        match = ", or set config.model.volume_size to match" if checkpoint is None else ""
        raise DataConfigError(
            f"{field('volume_size', volume_size)} but {source.name} in {source.path} "
            f"stores volumes of {stored}: prepare it with "
            f"--volume_shape={','.join(map(str, volume_size))} {again}{match}"
        )
    return source


def config_data_dir(config) -> str:
    """config.data.data_dir, which must be set."""
    data_dir = config.data.data_dir
    if not data_dir:
        raise DataConfigError(
            "config.data.data_dir is empty: set it to the directory given to "
            "python -m data_pipelines.prepare (the demo sets it to <workdir>/data)"
        )
    return data_dir


def crop_size(config) -> int:
    """The side of the square X-ray crop (config.model.image_size)."""
    height, width = (int(n) for n in config.model.image_size)
    if height != width:
        raise DataConfigError(
            f"config.model.image_size={tuple(config.model.image_size)}: X-ray crops are square"
        )
    return height


def open_for_config(config, name: str, modality: str, split: str, weight: float = 1.0) -> Source:
    """The split `name` of config.data.data_dir, checked against config.model's sizes."""
    if modality == "2d":
        crop_size(config)  # square
    model = config.model
    return open_for_model(
        name,
        config_data_dir(config),
        modality,
        split,
        model.image_size,
        model.volume_size,
        weight=weight,
    )


def report_texts(config, limit: int | None = None) -> list[str]:
    """Training reports of every configured source (at most `limit` each, spread over the
    split), e.g. to build a from-scratch WordPiece vocabulary."""
    data_dir = config_data_dir(config)
    texts = []
    for modality in ("2d", "3d"):
        for name, _ in parse_sources(config.data[f"sources_{modality}"]):
            source = open_source(name, data_dir, modality)
            skip = {ARRAY_KEY[modality]: tfds.decode.SkipDecoding()}
            reader = tfds.builder_from_directory(source.path).as_data_source(
                source.split, decoders=skip
            )
            count = source.size if limit is None else min(limit, source.size)
            for index in np.linspace(0, source.size - 1, count).round().astype(int):
                texts.append(reader[int(index)]["report"].decode("utf-8"))
    return texts
