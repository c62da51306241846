"""The ``preprocessing`` group of a run's config.json: how files become its inputs.

Written at the start of training from the prepared data the run reads (``recorded``), so that
``inference``'s file readers reproduce the stored records the run trained on even after the
defaults change; runs saved before the group existed get the defaults of their time
(``before_recorded``, an upgrade rule). ``data_pipelines.transforms.FilePreprocessing`` reads it.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from absl import logging

from data_pipelines.transforms import FilePreprocessing

# The stored X-ray size data_pipelines.prepare used by default before runs recorded theirs; the
# demo (phantoms) prepares its X-rays at the crop size instead.
PREPARE_DEFAULT_IMAGE_SIZE = 256


def recorded(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The preprocessing of the run ``config`` trains: stored X-ray size of its 2D training
    sources (the largest-weighted one when they differ, with a warning), volume shape, crop,
    HU window. Reads the sources' dataset info only, never a record."""
    from data_pipelines.sources import open_source, parse_sources  # see _source_names

    weights = dict(parse_sources(config.data.sources_2d))
    sizes = {
        name: open_source(name, config.data.data_dir, "2d", "train").array_shape[0]
        for name in weights
    }
    stored = None
    if sizes:
        stored = int(sizes[max(sizes, key=lambda name: weights[name])])
        if len(set(sizes.values())) > 1:
            logging.warning(
                "the 2D sources store X-rays at different sizes %s; config.json records %d "
                "(preprocessing.image_stored_size) for reading files at inference",
                sizes,
                stored,
            )
    return _preprocessing(config, stored)


def before_recorded(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a run saved without the group was trained on by default: X-rays prepared at
    data_pipelines.prepare's default size (the demo's phantoms: at the crop size)."""
    sources = _source_names(config.data.sources_2d)
    phantoms_only = bool(sources) and all(name.startswith("phantoms") for name in sources)
    stored = int(config.model.image_size[0]) if phantoms_only else PREPARE_DEFAULT_IMAGE_SIZE
    return _preprocessing(config, stored)


def _source_names(sources: str) -> list[str]:
    """The names of a ``sources_2d`` entry. The sources module (TFDS) is imported only
    when a config needs it: reading a saved config stays light."""
    from data_pipelines.sources import parse_sources

    return [name for name, _ in parse_sources(sources)]


def _preprocessing(config: ml_collections.ConfigDict, stored: int | None) -> dict[str, Any]:
    return FilePreprocessing(
        image_stored_size=stored,
        image_crop=int(config.model.image_size[0]),
        volume_shape=tuple(int(n) for n in config.model.volume_size),
        hu_window=tuple(float(v) for v in config.data.hu_window),
    ).record()


def record_preprocessing(config: ml_collections.ConfigDict) -> None:
    """Sets ``config.preprocessing`` (the group config.json records) for a run starting."""
    with config.unlocked():
        config.preprocessing = recorded(config)
