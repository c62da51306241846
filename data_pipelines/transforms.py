"""What every reader of the data applies to a record: the one transform layer.

The training pipeline, the evaluation batches, fine-tuning and inference all turn stored
records, image files and report texts into model inputs through these functions, so an X-ray,
a CT volume or a report reaches the model the same way whichever path read it:

  2D train    stored uint8 X-ray -> random square crop (seeded), float32 [0, 1]
  2D eval     stored uint8 X-ray -> centre square crop, float32 [0, 1]
  3D          stored int16 HU volume -> HU window, float32 [0, 1]
  flips       a volume mirrored along chosen axes, each with probability 1/2 (seeded)
  files       an X-ray or CT file on disk -> the builders' preparation, then the eval transform
  reports     texts -> padded token ids and mask

The image operations themselves (reading, letterbox, resizing, windowing, cropping) live in
`imaging`; this module composes them. Pure numpy; never imports jax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipelines import imaging


def train_transform_2d(
    image: np.ndarray, rng: np.random.Generator, crop_size: int = 224
) -> np.ndarray:
    """Random `crop_size` square crop of a stored uint8 image -> float32 [0, 1]."""
    return imaging.crop_unit(image, crop_size, rng)


def eval_transform_2d(image: np.ndarray, crop_size: int = 224) -> np.ndarray:
    """Centre `crop_size` square crop of a stored uint8 image -> float32 [0, 1]."""
    return imaging.crop_unit(image, crop_size, None)


def transform_3d(stored: np.ndarray, window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Stored HU volume [z, y, x] -> float32 [0, 1] through the HU `window` (train and eval:
    pre-training flips no volume, since reports name sides)."""
    return imaging.window_hu(stored, window)


def random_flips(volume: np.ndarray, rng: np.random.Generator, axes: Sequence[int]) -> np.ndarray:
    """Mirror `volume` along each of `axes` (0 = depth) with probability 1/2, one draw per axis
    in order: the augmentation of fine-tuning, where labels do not depend on sides."""
    for axis in axes:
        if rng.random() < 0.5:
            volume = np.flip(volume, axis)
    return volume


def xray_from_file(
    path: imaging.PathLike, crop_size: int = 224, stored_size: int = 256
) -> np.ndarray:
    """An X-ray file (DICOM, PNG, JPEG) -> float32 [crop_size, crop_size] in [0, 1], exactly as
    a record prepared at `--image_size=stored_size` and read by the eval pipeline would be.

    Raises imaging.SkipImage for a file the builders would skip as unreadable or unsupported.
    """
    stored = imaging.letterbox(imaging.read_image_2d(path), stored_size)
    return eval_transform_2d(stored, crop_size)


def volume_from_file(
    path: imaging.PathLike,
    shape: Sequence[int] = (32, 128, 128),
    window: tuple[float, float] = (-1000.0, 1000.0),
) -> np.ndarray:
    """A CT file (NIfTI) or DICOM series (its directory) -> float32 `shape` in [0, 1], exactly
    as a record prepared at `--volume_shape=shape` and read by the eval pipeline would be.

    Raises imaging.SkipVolume for a volume the builders would skip (not axial, too small, ...).
    """
    stored = imaging.prepare_volume(imaging.read_volume(path), shape)
    return transform_3d(stored, window)


def tokenize(reports: Sequence[str], tokenizer, max_length: int, prefix: str) -> dict:
    """Padded, truncated token ids and attention mask as int32 `<prefix>_text_{ids,mask}`."""
    encoded = tokenizer(
        list(reports),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    return {
        f"{prefix}_text_ids": encoded["input_ids"].astype(np.int32),
        f"{prefix}_text_mask": encoded["attention_mask"].astype(np.int32),
    }
