"""TFDS builder for CC-CCII (Clean-CC-CCII): chest CT scans given as folders of slice images,
labelled novel coronavirus pneumonia (NCP), common pneumonia (CP) or normal (3D, multiclass).

Task: 'multiclass', `label` an index into CLASS_NAMES (NCP 0, CP 1, Normal 2). Each scan folder
`{NCP,CP,Normal}/<patient>/<scan>/` holds its slices as PNG or JPEG files named by slice number;
they are stacked in numeric order of the last number in the file stem (2 before 10, whatever
the zero padding) into [slices, H, W] and resized to `volume_shape` with the same resampling as
pre-training volumes (`imaging.resize_volume`, no regard to spacing). The slice images carry no
orientation: the stack keeps the release's slice order and in-plane display orientation.

Intensities. The slices are already windowed 8-bit greyscale, not HU. Pre-training volumes are
stored as int16 HU and mapped to [0, 1] by the pipeline's HU window (`config.data.hu_window`,
-1000..1000 by default, `imaging.transform_3d`). So that the same transform maps these volumes
to [0, 1] exactly as their grey levels say, grey g in 0..255 is stored as the int16 value
low + g / 255 * (high - low) of the `gray_window` option (default the pre-training window,
-1000..1000: 7.8 units per grey level, so no two levels merge). The window the data was stored
for is in `metadata.json` (options.gray_window): evaluate with `config.data.hu_window` equal to
it, and grey g comes back as g / 255.

Splits: patients (the <patient> folder name, across the three classes, so a name that occurs
in two classes stays in one split) are split 70/15/15 into train/validation/test by a seeded
permutation; no patient is in two splits.

Records: `volume` int16 [D, H, W], `label`, `patient_id`, `scan_id`, `num_slices` (before
resizing) and `id` (CLASS/patient/scan). Skipped per split and reason: unnumbered slice (a
slice file whose stem has no number), inconsistent series (slices of different sizes), absurd
size (more slice pixels than `imaging.MAX_BYTES_3D` bytes), and the image reasons (unreadable
file, ...).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import imaging
from data_pipelines.builders import common

VERSION = "1.0.0"
TASK = "multiclass"
CLASS_NAMES = ("NCP", "CP", "Normal")
OPTIONS = ("volume_shape", "gray_window", "seed", "num_workers")
_RECORDED = ("volume_shape", "gray_window", "seed")
HELD_OUT = {"validation": 0.15, "test": 0.15}
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
UNNUMBERED_SLICE = "unnumbered slice"
LAYOUT = (
    "the Clean-CC-CCII folder with NCP/, CP/ and Normal/, each holding <patient>/<scan>/ "
    "folders of slice images (PNG or JPEG) named by slice number"
)


@dataclasses.dataclass(kw_only=True)
class CcCciiConfig(common.EvalVolumeConfig):
    """Stored shape, the int16 range grey 0..255 is stored as, split seed, reader processes."""

    gray_window: tuple[int, int] = (-1000, 1000)


@dataclasses.dataclass(frozen=True, slots=True)
class _Scan:
    """One scan folder with its slice files in slice order, ready for a worker."""

    label: int
    patient_id: str
    scan_id: str
    slices: tuple[str, ...]  # in slice-number order; empty when a stem has no number
    volume_shape: tuple[int, int, int]
    gray_window: tuple[int, int]

    @property
    def id(self) -> str:
        return f"{CLASS_NAMES[self.label]}/{self.patient_id}/{self.scan_id}"


def slice_number(path: str | Path) -> int | None:
    """The last number in a slice file's stem ('0012.png' -> 12, 'IM-0001-0010.jpg' -> 10)."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it has the three class folders (else LayoutError)."""
    root = Path(manual_dir)
    for name in CLASS_NAMES:
        common.require(root / name, root, LAYOUT)
    return root


def gray_to_stored(gray: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """Grey levels 0..255 (float) -> the int16 values `imaging.window_hu(., window)` maps back
    to grey / 255."""
    low, high = window
    return imaging.to_stored_hu(low + np.asarray(gray, np.float32) * ((high - low) / 255.0))


def _load(scan: _Scan) -> dict | str:
    """The record of one scan, or why it is skipped (runs in a worker)."""
    if not scan.slices:
        return UNNUMBERED_SLICE
    images = []
    for path in scan.slices:
        pixels = common.load_image(path)
        if isinstance(pixels, str):
            return pixels
        if images and pixels.shape != images[0].shape:
            return common.Skip(imaging.INCONSISTENT_SERIES, f"{path} ({pixels.shape})")
        if len(scan.slices) * pixels.size > imaging.MAX_BYTES_3D:
            detail = f"{len(scan.slices)} slices of {pixels.shape}"
            return common.Skip(imaging.ABSURD_SIZE, f"{Path(path).parent} ({detail})")
        images.append(pixels)
    stack = imaging.resize_volume(np.stack(images).astype(np.float32), scan.volume_shape)
    return {
        "volume": gray_to_stored(stack, scan.gray_window),
        "label": scan.label,
        "patient_id": scan.patient_id,
        "scan_id": scan.scan_id,
        "num_slices": len(images),
        "id": scan.id,
    }


class CcCcii(common.EvalBuilder):
    """CC-CCII CT scans: NCP, CP or Normal."""

    RECORDED = _RECORDED
    TEXT = ("patient_id", "scan_id", "id")
    load = staticmethod(_load)

    def _features(self) -> dict[str, Any]:
        return {"num_slices": tfds.features.Scalar(dtype=np.int32)}

    def _inputs(self, root: Path) -> dict[str, list[_Scan]]:
        cfg = self.builder_config
        scans = _scans(check_manual_dir(root), cfg.volume_shape, tuple(cfg.gray_window))
        split_of = common.split_groups((s.patient_id for s in scans), HELD_OUT, cfg.seed)
        return {
            split: [s for s in scans if split_of[s.patient_id] == split]
            for split in ("train", *HELD_OUT)
        }


def _scans(
    root: Path, volume_shape: tuple[int, int, int], gray_window: tuple[int, int]
) -> list[_Scan]:
    """Every scan folder with at least one slice image, by class, patient and scan name."""
    out = []
    for label, name in enumerate(CLASS_NAMES):
        for scan in sorted(p for p in (root / name).glob("*/*") if p.is_dir()):
            files = [p for p in scan.iterdir() if p.suffix.lower() in SLICE_SUFFIXES]
            if not files:
                continue
            numbers = [slice_number(p) for p in files]
            ordered = () if None in numbers else sorted(zip(numbers, files, strict=True))
            out.append(
                _Scan(
                    label=label,
                    patient_id=scan.parent.name,
                    scan_id=scan.name,
                    slices=tuple(str(p) for _, p in ordered),
                    volume_shape=volume_shape,
                    gray_window=gray_window,
                )
            )
    return out


def make_builder(config_name: str, data_dir: str, **options: Any) -> CcCcii:
    """A builder for config 'ct' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("cc_ccii", options, OPTIONS)
    window = options.get("gray_window", CcCciiConfig.gray_window)
    if len(window) != 2 or not -32768 <= window[0] < window[1] <= 32767:
        raise ValueError(f"cc_ccii: gray_window={window} must be two int16 values, low < high")
    return common.array_record_builder(CcCcii, CcCciiConfig, config_name, data_dir, options)
