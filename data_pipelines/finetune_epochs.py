"""Fine-tuning epochs: a labelled 3D split in seeded order and full batches, with host-side
random flips drawn from (seed, epoch, record) alone, so any number of reader threads agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from data_pipelines import transforms
from data_pipelines.sources import Source


@dataclasses.dataclass
class _LabelledRecord:
    """Record index -> {'volume': windowed, flipped float32, label_key: label}, in grain's reader
    threads; the flips are drawn from (seed, epoch, index) alone, so any thread reads alike."""

    source: Source
    label_key: str
    window: tuple[float, float]
    flip_axes: tuple[int, ...]
    seed: int
    epoch: int
    _reader: Any = dataclasses.field(default=None, init=False, repr=False)  # opened on first use

    def __call__(self, index: int) -> dict:
        if self._reader is None:
            self._reader = self.source.open()
        record = self._reader[int(index)]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        volume = transforms.random_flips(record["volume"], rng, self.flip_axes)
        return {
            "volume": transforms.transform_3d(volume, self.window),
            self.label_key: np.asarray(record[self.label_key]),
        }


def labelled_epoch(
    source: Source,
    label_key: str,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    window: tuple[float, float],
    flip_axes: tuple[int, ...] = (),
    threads: int = 1,
) -> Iterator[dict]:
    """One epoch of a labelled 3D split in full batches, for fine-tuning.

    Yields {'volume': float32 [B, D, H, W] in [0, 1], label_key: [B, ...]} in an order seeded by
    (seed, epoch); each volume is HU-windowed and mirrored along each of `flip_axes` (0 = depth)
    with probability 1/2, seeded by (seed, epoch, record index). The last partial batch is
    dropped. The batches are the same whatever `threads` (the reader threads).
    """
    order_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    load = _LabelledRecord(
        source, label_key, tuple(float(v) for v in window), tuple(flip_axes), seed, epoch
    )
    ds = grain.MapDataset.range(source.size).shuffle(seed=order_seed).map(load)
    ds = ds.batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads)))
