"""Prepared records damaged on purpose, for the tests of how the pipeline copes with them.

Imported as ``tests.damaged_records``.
"""

import shutil
from collections.abc import Callable
from pathlib import Path

import tensorflow_datasets as tfds
from array_record.python import array_record_module

# (record bytes, the dataset's TFDS features) -> the bytes to store instead
Damage = Callable[[bytes, tfds.features.FeaturesDict], bytes]


def damage_train_records(
    data_dir: Path, copy_to: Path, config: str, damage: dict[int, Damage]
) -> Path:
    """A copy of ``data_dir`` in which train record ``i`` of ``config`` (e.g. "phantoms/xray",
    version 1.0.0, one shard) is replaced by ``damage[i]`` of it; returns the copy."""
    shutil.copytree(data_dir, copy_to)
    prepared = copy_to / config / "1.0.0"
    features = tfds.builder_from_directory(prepared).info.features
    shard = prepared / f"{config.split('/')[0]}-train.array_record-00000-of-00001"
    reader = array_record_module.ArrayRecordReader(str(shard))
    records = reader.read_all()
    reader.close()
    writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
    for i, record in enumerate(records):
        writer.write(damage[i](record, features) if i in damage else record)
    writer.close()
    return copy_to
