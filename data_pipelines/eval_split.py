"""Evaluation batches: every record of a prepared split in order, centre-cropped (2D) or
HU-windowed (3D), with whatever labels, reports and ids the records hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from data_pipelines import transforms
from data_pipelines.sources import crop_size, open_for_config


@dataclasses.dataclass(frozen=True)
class _EvalTransform:
    modality: str
    crop: int
    window: tuple[float, float]

    def __call__(self, record: dict) -> dict:
        out = {k: v for k, v in record.items() if k in ("labels", "label", "lesion_slices")}
        # Downstream (probe) datasets carry no report; pre-training datasets carry no patient id.
        for key in ("report", "id", "patient_id"):
            if key in record:
                out[key] = record[key].decode("utf-8")
        if self.modality == "2d":
            out["image"] = transforms.eval_transform_2d(record["image"], self.crop)
        else:
            out["volume"] = transforms.transform_3d(record["volume"], self.window)
        return out


def _collate_eval(rows: Sequence[dict]) -> dict:
    return {
        k: (
            np.stack([r[k] for r in rows])
            if isinstance(rows[0][k], np.ndarray)
            else [r[k] for r in rows]
        )
        for k in rows[0]
    }


def eval_batches(
    config, name: str, modality: str, split: str = "test", batch_size: int = 64
) -> Iterator[dict]:
    """Every record of a split in order, centre-cropped (2D) or windowed (3D), no shuffling.

    Yields {'image' | 'volume': float32 [b, ...], plus what the records hold of 'labels' [b, F]
    (multi-hot), 'label' [b] (class index), 'lesion_slices' bool [b, D], and lists of str
    'report', 'id', 'patient_id'}; the last batch holds the remainder.
    """
    source = open_for_config(config, name, modality, split)
    transform = _EvalTransform(
        modality, crop_size(config), tuple(float(v) for v in config.data.hu_window)
    )
    ds = grain.MapDataset.source(source.open()).map(transform)
    return iter(ds.batch(batch_size, batch_fn=_collate_eval))
