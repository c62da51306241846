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

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import imaging
from unimedi_jax.core.errors import UserError


class InputFileError(UserError):
    """A file that cannot be read as the model input asked for; the message says why. Raised
    by `FilePreprocessing`, which the JAX and the PyTorch readers both call."""


IMAGE_HINT = "give a PNG, JPEG or single-frame grey DICOM X-ray"
VOLUME_HINT = "give a NIfTI file, a multi-frame DICOM file or a folder of one axial DICOM series"


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
    intensity: str = imaging.AUTO,
) -> np.ndarray:
    """A CT file (NIfTI) or DICOM series (its directory) -> float32 `shape` in [0, 1], exactly
    as a record prepared at `--volume_shape=shape` and read by the eval pipeline would be.

    `intensity` states what the values are (`imaging.as_hounsfield`: "auto", "hu",
    "windowed:MAX"). Raises imaging.SkipVolume for a volume the builders would skip (not
    axial, too small, ...) or whose values cannot be HU; warns (imaging.ExtentWarning) when its
    extent or spacing is far from a whole chest.
    """
    volume = imaging.as_hounsfield(imaging.read_volume(path), intensity, window)
    canonical = imaging.canonicalize(volume)
    imaging.warn_unusual_extent(canonical, shape)
    stored = imaging.to_stored_hu(imaging.resize_volume(canonical.hu, shape))
    return transform_3d(stored, window)


# The file preprocessing this version applies; a run records them (`FilePreprocessing`) so a
# later change shows as a record that this code refuses instead of a silent difference.
LETTERBOX = "letterbox"  # longer side to the stored size (area shrink, bilinear), centred padding
AREA_RESIZE = "area"  # `imaging.resize_volume`: area shrink, linear enlarge, spacing ignored
CANONICAL_ORIENTATION = "".join(imaging.CANONICAL_AXCODES)


@dataclasses.dataclass(frozen=True)
class FilePreprocessing:
    """How a run turns an X-ray or CT file into a model input: what it trained on, as its
    config.json records it (`preprocessing`), so the file path of inference reproduces the
    records the run was trained on, whatever the defaults of a later version."""

    image_stored_size: int | None  # the letterbox size of the stored X-rays; None: none trained on
    image_crop: int  # the square centre crop of evaluation
    volume_shape: tuple[int, int, int]  # the stored (= model input) volume shape D, H, W
    hu_window: tuple[float, float]
    image_resize: str = LETTERBOX
    volume_orientation: str = CANONICAL_ORIENTATION
    volume_resize: str = AREA_RESIZE

    def __post_init__(self):
        supported = {
            "image_resize": LETTERBOX,
            "volume_orientation": CANONICAL_ORIENTATION,
            "volume_resize": AREA_RESIZE,
        }
        for key, value in supported.items():
            if getattr(self, key) != value:
                raise ValueError(
                    f"preprocessing.{key}={getattr(self, key)!r}: this version reads files only "
                    f"with {value!r}"
                )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FilePreprocessing:
        """From a config.json `preprocessing` group (lists as tuples)."""
        stored = record["image_stored_size"]
        return cls(
            image_stored_size=None if stored is None else int(stored),
            image_crop=int(record["image_crop"]),
            volume_shape=tuple(int(n) for n in record["volume_shape"]),
            hu_window=tuple(float(v) for v in record["hu_window"]),
            image_resize=record["image_resize"],
            volume_orientation=record["volume_orientation"],
            volume_resize=record["volume_resize"],
        )

    def record(self) -> dict[str, Any]:
        """The config.json form (JSON types)."""
        return {
            **dataclasses.asdict(self),
            "volume_shape": list(self.volume_shape),
            "hu_window": list(self.hu_window),
        }

    def image(self, path: imaging.PathLike) -> np.ndarray:
        """An X-ray file -> float32 [crop, crop] in [0, 1] (`xray_from_file`); InputFileError
        names a file that cannot be one."""
        if self.image_stored_size is None:
            raise ValueError(
                "preprocessing.image_stored_size is null: the run trained on no X-rays, so no "
                "stored size says how to letterbox a file"
            )
        try:
            return xray_from_file(path, self.image_crop, self.image_stored_size)
        except imaging.SkipImage as err:
            raise InputFileError(f"{err}: {IMAGE_HINT}") from err

    def volume(self, path: imaging.PathLike, intensity: str = imaging.AUTO) -> np.ndarray:
        """A CT file or DICOM folder -> float32 `volume_shape` in [0, 1] (`volume_from_file`,
        `intensity` as there); InputFileError names a file that cannot be one."""
        try:
            imaging.check_intensity(intensity)
        except ValueError as err:
            raise InputFileError(str(err)) from err
        try:
            return volume_from_file(path, self.volume_shape, self.hu_window, intensity)
        except imaging.SkipVolume as err:
            hint = "" if err.reason == imaging.NOT_HU else f": {VOLUME_HINT}"
            raise InputFileError(f"{err}{hint}") from err


def read_file(
    preprocessing: FilePreprocessing, kind: str, path: str, intensity: str = imaging.AUTO
) -> tuple[np.ndarray | None, str | None, list[str]]:
    """One input file as `kind` (imaging.IMAGE or VOLUME): (array, None, warning lines) or
    (None, the refusal, warning lines). What embed's reader processes run: numpy only, so a
    worker never imports jax, and everything it returns pickles."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", imaging.ReadWarning)
        try:
            if kind == imaging.IMAGE:
                array, error = preprocessing.image(path), None
            else:
                array, error = preprocessing.volume(path, intensity), None
        except InputFileError as err:
            array, error = None, str(err)
    return (
        array,
        error,
        [str(w.message) for w in caught if issubclass(w.category, imaging.ReadWarning)],
    )


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
