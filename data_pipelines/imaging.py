"""Reading and transforming medical images: 2D X-rays (JPEG, PNG, DICOM) and 3D CT (NIfTI, DICOM).

Two cost regimes. Reading, reorienting and resizing are done once, by the TFDS builders, and
produce compact arrays: a 256x256 uint8 letterboxed X-ray and a 32x128x128 int16 HU volume.
The per-sample operations on those arrays (crops, HU window) are a few vectorised numpy passes,
so they stay far below a millisecond per sample; `transforms` composes them into what each
reader applies.

Inputs a builder should skip raise `SkipImage` (2D) or `SkipVolume` (3D); `reason` is a short
category ("unreadable file", "not axial", ...) to count skips by, and the message names the file.

Pure numpy, PIL, pydicom and nibabel; never imports jax.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel import orientations
from PIL import Image, ImageMode
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from data_pipelines import dicom_codecs

dicom_codecs.register()  # 12-bit JPEG Extended through GDCM, beside pydicom's own plugins

PathLike = str | os.PathLike[str]

# Skip reasons: builders count skipped inputs by these.
UNREADABLE = "unreadable file"
UNSUPPORTED = "unsupported image"
NOT_3D = "not 3D"
INCONSISTENT_SERIES = "inconsistent series"
BAD_AFFINE = "bad affine"
NAN_VOXELS = "NaN voxels"
NOT_AXIAL = "not axial"
TOO_SMALL = "too small"
NO_PIXEL_DATA = "no pixel data"
ABSURD_SIZE = "absurd size"
CONSTANT = "constant image"
NOT_HU = "not Hounsfield units"

# Pixel data a header declares (pixels x bytes per pixel) beyond these is refused before it is
# read, as "absurd size": honouring it could exhaust a worker's memory. 64 MiB is twice a
# 4280 x 3520 16-bit detector image, 512 MiB a 512 x 512 x 1024 int16 CT, which peaks at about
# 2.1 GiB in a reader (float32 copies; docs/data.md).
MAX_BYTES_2D = 2**26
MAX_BYTES_3D = 2**29
# An X-ray whose shorter side is below this (the default training crop, 224 of a stored 256),
# or below the stored size when that is smaller, is skipped as "too small"; one whose most
# common grey level covers this fraction of it as "constant image" (what a JPEG whose header
# claims more pixels than its data holds decodes to: a flat grey).
MIN_XRAY_SIDE = 224
CONSTANT_FRACTION = 0.99
_PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)

# Canonical voxel order of every prepared volume, as nibabel axis codes of array axes 0, 1, 2:
# z towards Superior, y towards Posterior, x towards patient Left.
CANONICAL_AXCODES = ("S", "P", "L")
# Voxels whose spacings agree within this ratio are isotropic: any plane is then as good as axial.
_ISOTROPIC_RATIO = 1.01


class SkipImage(Exception):  # noqa: N818 - a skip to count, named as the builders use it
    """An input a builder should skip and count; `reason` is one of the module's skip reasons."""

    def __init__(self, reason: str, path: PathLike | str, detail: str = ""):
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{reason}: {self.path}" + (f" ({detail})" if detail else ""))


class SkipVolume(SkipImage):
    """A 3D input a builder should skip: unreadable, not axial, too small, NaN voxels, ..."""


# ----------------------------------------------------------------------------------------------
# 2D


def is_dicom_file(path: PathLike) -> bool:
    """True for a `.dcm`/`.dicom` name or a file with the 'DICM' magic at byte 128."""
    if Path(path).suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def read_image_2d(path: PathLike) -> np.ndarray:
    """Read an X-ray as uint8 [H, W], bone bright; DICOM is windowed as its header asks.

    Raises SkipImage (reason "unreadable file", "unsupported image", "no pixel data" or
    "absurd size") naming the file.
    """
    try:
        dicom = is_dicom_file(path)
    except OSError as e:
        raise SkipImage(UNREADABLE, path, str(e)) from e
    unit = _read_dicom_2d(path) if dicom else _read_pil_2d(path)
    return np.rint(unit * 255.0).astype(np.uint8)


def _read_pil_2d(path: PathLike) -> np.ndarray:
    """JPEG/PNG -> float [0, 1]; 16-bit and float images are scaled over their own range."""
    try:
        with Image.open(path) as img:
            mode = ImageMode.getmode(img.mode)
            itemsize = np.dtype(mode.typestr).itemsize * len(mode.bands)
            _check_size((img.height, img.width), itemsize, MAX_BYTES_2D, path)
            img.load()
            if img.mode == "L":
                return np.asarray(img, dtype=np.float32) / 255.0
            if img.mode.startswith(("I", "F")):
                return _minmax_unit(np.asarray(img, dtype=np.float64))
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as e:
        raise SkipImage(ABSURD_SIZE, path, str(e)) from e
    except (OSError, ValueError, KeyError) as e:  # KeyError: a mode ImageMode does not know
        raise SkipImage(UNREADABLE, path, f"{type(e).__name__}: {e}") from e


def _check_size(
    shape: Sequence[int], itemsize: int, limit: int, path: PathLike, skip: type = SkipImage
) -> None:
    """Refuse a header shape that is empty or whose data (elements x `itemsize` bytes) is above
    `limit` bytes, before reading it."""
    shape = tuple(int(n) for n in shape)
    size = math.prod(shape) * itemsize
    if min(shape, default=0) < 1 or size > limit:
        raise skip(ABSURD_SIZE, path, f"header shape {shape}: {size} bytes of data, limit {limit}")


def check_xray(pixels: np.ndarray, path: PathLike, min_side: int = MIN_XRAY_SIDE) -> None:
    """Raise SkipImage when a read X-ray is not worth storing: "too small" (shorter side under
    `min_side`: it would be enlarged to fill a training crop) or "constant image" (one grey
    level covers CONSTANT_FRACTION of it; `pixels` uint8)."""
    if min(pixels.shape) < min_side:
        raise SkipImage(TOO_SMALL, path, f"{pixels.shape[0]} x {pixels.shape[1]} pixels")
    top = int(np.bincount(pixels.ravel(), minlength=256).max())
    if top >= CONSTANT_FRACTION * pixels.size:
        raise SkipImage(CONSTANT, path, f"{top} of its {pixels.size} pixels are one value")


def _read_dicom_2d(path: PathLike) -> np.ndarray:
    """DICOM -> float [0, 1]: modality LUT/rescale, VOI LUT or window, MONOCHROME1 inverted."""
    _, ds = _read_dicom(str(path))
    pixels = _pixels(str(path), ds)
    photometric = ds.get("PhotometricInterpretation", "")
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or pixels.ndim != 2:
        raise SkipImage(UNSUPPORTED, path, f"{photometric} with pixel shape {pixels.shape}")
    try:
        unit = _voi_unit(apply_modality_lut(pixels, ds), ds)
    except (ValueError, NotImplementedError, AttributeError) as e:  # e.g. a zero window width
        raise SkipImage(UNSUPPORTED, path, f"{type(e).__name__}: {e}") from e
    return 1.0 - unit if photometric == "MONOCHROME1" else unit


def _voi_unit(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Apply the VOI LUT or window and map its full output range to [0, 1].

    Scaling over the transform's output range (not the image's) keeps the window's meaning:
    values below the window are 0, above it 1. Without a VOI the image's own range is used.
    """
    if ds.get("VOILUTSequence"):
        first_map = int(ds.VOILUTSequence[0].LUTDescriptor[1])
        n_entries = int(ds.VOILUTSequence[0].LUTDescriptor[0]) or 2**16
        lut = apply_voi(np.arange(first_map, first_map + n_entries), ds)
        lo, hi = float(lut.min()), float(lut.max())
        out = apply_voi(np.rint(values).astype(np.int64), ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # The window sends -inf/+inf to the bottom/top of its output range.
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
        out = apply_windowing(values, ds)
    else:
        return _minmax_unit(values)
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((out.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _minmax_unit(values: np.ndarray) -> np.ndarray:
    """Scale an array over its own [min, max] to float32 [0, 1] (constant -> zeros)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def letterbox(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Resize the longer side to `size` and zero-pad the shorter one, centred: uint8 [size, size].

    Shrinking averages areas (PIL BOX) so fine detail does not alias; enlarging is bilinear.
    """
    h, w = image.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        image = np.asarray(pil.resize((new_w, new_h), resample=resample))
    out = np.zeros((size, size), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = image
    return out


def crop_unit(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Square `size` crop of a uint8 image at a random (`rng`) or the central offset, scaled to
    float32 [0, 1] in one pass."""
    h, w = image.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} exceeds image shape {image.shape}")
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = image[top : top + size, left : left + size]
    return np.multiply(crop, np.float32(1.0 / 255.0), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# 3D


@dataclasses.dataclass(frozen=True)
class Volume:
    """A CT volume in HU with the affine that maps its array indices to RAS+ millimetres."""

    hu: np.ndarray  # float32, 3 axes
    affine: np.ndarray  # [4, 4], voxel index (array axis order) -> RAS+ mm
    path: str
    # Of a DICOM folder: each series it held ("UID: axial, 3 slices"), for refusals to name.
    series: tuple[str, ...] = ()
    modality: str = ""  # DICOM Modality ("CT", "MR"); "" for NIfTI
    rescaled: bool = True  # its header maps stored values to units (rescale tags, scl_slope)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def read_volume(path: PathLike) -> Volume:
    """Read a directory as a DICOM series, a DICOM file as a (multi-frame) series, anything else
    as NIfTI."""
    if Path(path).is_dir():
        return read_dicom_series(path)
    try:
        dicom = is_dicom_file(path)
    except OSError as e:
        raise SkipVolume(UNREADABLE, path, str(e)) from e
    return read_dicom_series([path]) if dicom else read_nifti(path)


def read_nifti(path: PathLike) -> Volume:
    """Read a NIfTI volume (scl_slope/inter applied) as float32 with its RAS+ affine.

    Before the voxels are read, the data the header declares (voxels x bytes per voxel) is
    checked against MAX_BYTES_3D ("absurd size"); of a .nii.gz nibabel decompresses only that
    much. (The gzip trailer's size is not used: in a truncated download those 4 bytes are
    arbitrary, and the file is unreadable, not absurd.)
    """
    try:
        img = nib.load(path)
        itemsize = img.header.get_data_dtype().itemsize
    except _NIFTI_ERRORS as e:
        raise SkipVolume(UNREADABLE, path, f"{type(e).__name__}: {e}") from e
    _check_size(img.shape, itemsize, MAX_BYTES_3D, path, SkipVolume)
    try:
        hu = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except _NIFTI_ERRORS as e:
        raise SkipVolume(UNREADABLE, path, f"{type(e).__name__}: {e}") from e
    if hu.ndim > 3 and all(n == 1 for n in hu.shape[3:]):
        hu = hu.reshape(hu.shape[:3])
    if hu.ndim != 3:
        raise SkipVolume(NOT_3D, path, f"shape {hu.shape}")
    slope = float(img.header["scl_slope"])
    return Volume(hu, affine, str(path), rescaled=np.isfinite(slope) and slope != 0)


IMAGE, VOLUME, FOLDER, OTHER = "image", "volume", "folder", "other"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".jp2")
# How PNG, JPEG, TIFF (both byte orders) and JPEG 2000 files start, whatever their name.
_IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x00\x0cjP  ",
)


def input_kind(path: PathLike) -> str:
    """What a path on disk is to the model, by its name and content: VOLUME (a NIfTI file, a
    multi-frame DICOM file, a folder whose DICOM files are placed in space: a CT series), IMAGE
    (a file named or starting as an image: PNG, JPEG, TIFF, a single-frame DICOM), OTHER (a file
    that is neither: a CSV, a text, a DICOMDIR index, a structured report) or FOLDER (anything
    else: its entries are inputs). Raises FileNotFoundError for a path that does not exist."""
    path = Path(path)
    if path.is_dir():
        files = (p for p in sorted(path.iterdir()) if p.is_file())
        return VOLUME if any(_placed_dicom(p) for p in files) else FOLDER
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return VOLUME
    header = _dicom_header(path)
    if header is not None and int(header.get("NumberOfFrames", 1) or 1) > 1:
        return VOLUME
    if header is not None and "Rows" not in header:  # DICOMDIR, report, presentation state
        return OTHER
    if header is not None or path.name.lower().endswith(IMAGE_SUFFIXES):
        return IMAGE
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return IMAGE  # the image reader names the error
    return IMAGE if head.startswith(_IMAGE_SIGNATURES) else OTHER


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file (pixels not read); None for any other or unreadable file."""
    try:
        if not is_dicom_file(path):
            return None
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # pydicom raises many types for bad files; the reader names them later
        return None


def _placed_dicom(path: Path) -> bool:
    """A DICOM file with a position in the patient: a slice (or frames) of a CT series."""
    header = _dicom_header(path)
    return header is not None and (
        "ImagePositionPatient" in header or "PerFrameFunctionalGroupsSequence" in header
    )


class ReadWarning(UserWarning):
    """An input was read, with something its user should know: one line."""


class OtherSeriesWarning(ReadWarning):
    """A DICOM folder held more than one series; the largest was read, the others are named."""


class SetAsideWarning(ReadWarning):
    """Files of a DICOM folder that are no image of a series (not DICOM, a DICOMDIR index, a
    report or presentation state) were set aside; the line counts them by kind."""


# Media Storage Directory Storage: the SOP class of a DICOMDIR index.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclasses.dataclass(frozen=True)
class _Frame:
    """One 2D frame of a series: a single-frame file or one frame of a multi-frame file."""

    path: str
    hu: np.ndarray  # float, modality LUT / rescale applied
    position: np.ndarray  # ImagePositionPatient (LPS mm) of its first pixel
    orientation: np.ndarray  # ImageOrientationPatient: row cosines, column cosines
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns
    thickness: float


def read_dicom_series(source: PathLike | Sequence[PathLike]) -> Volume:
    """Read one DICOM series (a directory or its files) as float32 HU with a RAS+ affine.

    Files that are no image (not DICOM, DICOMDIR, reports) are set aside with a SetAsideWarning.
    The others are grouped by SeriesInstanceUID; when there are several series the one with the
    most frames is read and an OtherSeriesWarning names the others (a study folder often holds a
    scout or a second reconstruction); `Volume.series` describes them all. Multi-frame files
    (enhanced CT) give one slice a frame, placed by its functional groups. Slices are sorted by
    ImagePositionPatient along the slice normal (row x column cosines of
    ImageOrientationPatient), never by file name, and each is rescaled by its own
    slope/intercept. Array axes are (slice, row, column) in that order;
    `canonicalize` puts them into the canonical order.
    """
    files = _series_files(source)
    name = str(source) if isinstance(source, str | os.PathLike) else str(Path(files[0]).parent)
    datasets = _series_images(files, name)
    found = _describe_series(datasets)
    datasets = _largest_series(datasets, name)
    frames = [frame for path, ds in datasets for frame in _frames(path, ds)]
    first = frames[0]
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    for frame in frames:
        same_orient = np.allclose(frame.orientation, first.orientation, atol=1e-3)
        if not same_orient or frame.hu.shape != first.hu.shape:
            raise SkipVolume(INCONSISTENT_SERIES, name, "slices differ in orientation or size")
    order = np.argsort([frame.position @ normal for frame in frames], kind="stable")
    frames = [frames[i] for i in order]
    positions = np.array([frame.position for frame in frames])
    if len(frames) > 1 and np.min(np.diff(positions @ normal)) < 1e-3:
        raise SkipVolume(INCONSISTENT_SERIES, name, "two slices share a position")
    hu = np.stack([frame.hu for frame in frames]).astype(np.float32)
    if len(frames) > 1:
        step = (positions[-1] - positions[0]) / (len(frames) - 1)
    else:
        step = normal * first.thickness
    row_spacing, col_spacing = first.spacing
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = col_cos * row_spacing  # moving down one row
    lps[:3, 2] = row_cos * col_spacing  # moving right one column
    lps[:3, 3] = positions[0]
    ds = datasets[0][1]
    return Volume(
        hu,
        np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps,
        name,
        found,
        modality=str(ds.get("Modality", "")),
        rescaled=_frame_attribute(ds, 0, "PixelValueTransformationSequence", "RescaleIntercept")
        is not None,
    )


def _has_dicom_magic(path: str) -> bool:
    """'DICM' at byte 128: what every DICOM file written to a disk or exported starts with."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError as e:
        raise SkipVolume(UNREADABLE, path, str(e)) from e


def _series_images(files: Sequence[str], name: str) -> list[tuple[str, pydicom.Dataset]]:
    """The DICOM images among `files`; the rest is set aside with one SetAsideWarning line
    (files without the DICOM magic, DICOMDIR indexes, objects without pixel data such as
    structured reports and presentation states). A DICOM file that does not parse, or an image
    without its pixels, is an error: it is damaged, not out of place. Nothing left is a
    SkipVolume saying what was there."""
    images: list[tuple[str, pydicom.Dataset]] = []
    aside: dict[str, list[str]] = {}
    for path in files:
        if not _has_dicom_magic(path):
            aside.setdefault("not DICOM", []).append(Path(path).name)
            continue
        ds = _dcmread(path, SkipVolume)
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        if sop == DICOMDIR_SOP_CLASS:
            aside.setdefault("DICOMDIR index", []).append(Path(path).name)
        elif not any(tag in ds for tag in _PIXEL_DATA_TAGS):
            kind = pydicom.uid.UID(sop).name if sop else "no SOP class"
            if "Image Storage" in kind or "Rows" in ds:  # an image that lost its pixels
                raise SkipVolume(NO_PIXEL_DATA, path, f"a {kind} file without PixelData")
            aside.setdefault(f"without pixel data ({kind})", []).append(Path(path).name)
        else:
            _check_pixel_size(path, ds, SkipVolume)
            images.append((path, ds))
    if not aside:
        return images
    counts = "; ".join(
        f"{len(names)} {kind}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        for kind, names in aside.items()
    )
    if not images:
        dicom = any(kind != "not DICOM" for kind in aside)
        raise SkipVolume(NO_PIXEL_DATA if dicom else UNREADABLE, name, f"no DICOM image: {counts}")
    warnings.warn(
        f"{name}: set aside {sum(map(len, aside.values()))} files that are no image of a "
        f"series ({counts}); read its {len(images)} DICOM images",
        SetAsideWarning,
        stacklevel=3,
    )
    return images


def _orientation_name(ds: pydicom.Dataset) -> str:
    """axial, coronal, sagittal or oblique: the plane of a file's first frame."""
    cosines = _frame_attribute(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    if cosines is None or len(cosines) != 6:
        return "no orientation"
    normal = np.abs(np.cross(np.asarray(cosines[:3], float), np.asarray(cosines[3:], float)))
    if normal.max() < 0.9:  # more than about 25 degrees from every anatomical plane
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _describe_series(datasets: list[tuple[str, pydicom.Dataset]]) -> tuple[str, ...]:
    """Each series among `datasets`: "UID: axial, 3 slices" (the plane of its first file)."""
    series: dict[str, list[pydicom.Dataset]] = {}
    for _, ds in datasets:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    return tuple(
        f"{uid or '(no SeriesInstanceUID)'}: {_orientation_name(members[0])}, "
        f"{sum(int(ds.get('NumberOfFrames', 1) or 1) for ds in members)} slices"
        for uid, members in sorted(series.items())
    )


def _series_files(source: PathLike | Sequence[PathLike]) -> list[str]:
    if isinstance(source, str | os.PathLike):
        if not Path(source).is_dir():
            raise SkipVolume(UNREADABLE, source, "not a directory of DICOM files")
        files = sorted(str(p) for p in Path(source).iterdir() if p.is_file())
    else:
        files = [str(f) for f in source]
    if not files:
        raise SkipVolume(UNREADABLE, str(source), "no files in the series")
    return files


def _largest_series(
    datasets: list[tuple[str, pydicom.Dataset]], name: str
) -> list[tuple[str, pydicom.Dataset]]:
    """The files of the series with the most frames (ties: the first UID in sorted order),
    warning with the others' UIDs and frame counts."""
    series: dict[str, list[tuple[str, pydicom.Dataset]]] = {}
    for path, ds in datasets:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if len(series) == 1:
        return datasets
    frames = {
        uid: sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in members)
        for uid, members in series.items()
    }
    chosen = min(series, key=lambda uid: (-frames[uid], uid))
    others = ", ".join(
        f"{uid or '(no SeriesInstanceUID)'} ({frames[uid]} frames)"
        for uid in sorted(series)
        if uid != chosen
    )
    warnings.warn(
        f"{name} holds {len(series)} DICOM series: read the largest, {chosen} "
        f"({frames[chosen]} frames); left out {others}. Put each series in its own folder to "
        "read another.",
        OtherSeriesWarning,
        stacklevel=3,
    )
    return series[chosen]


def _read_dicom(path: str, skip: type = SkipImage) -> tuple[str, pydicom.Dataset]:
    """(path, header) of one DICOM file with pixel data whose declared size is sane."""
    ds = _dcmread(path, skip)
    if not any(tag in ds for tag in _PIXEL_DATA_TAGS):
        raise skip(NO_PIXEL_DATA, path, "the file has no PixelData element")
    _check_pixel_size(path, ds, skip)
    return path, ds


def _dcmread(path: str, skip: type) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for bad files
        raise skip(UNREADABLE, path, f"{type(e).__name__}: {e}") from e


def _check_pixel_size(path: str, ds: pydicom.Dataset, skip: type) -> None:
    """Refuse a frame or frame stack whose declared size is above the readers' limits."""
    if "Rows" in ds and "Columns" in ds:
        plane = (int(ds.Rows), int(ds.Columns))
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        itemsize = samples * -(-int(ds.get("BitsAllocated", 16) or 16) // 8)
        _check_size(plane, itemsize, MAX_BYTES_2D, path, skip)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        _check_size((frames, *plane), itemsize, MAX_BYTES_3D, path, skip)


def _pixels(path: str, ds: pydicom.Dataset, skip: type = SkipImage) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:  # pydicom raises many types for undecodable pixels
        raise skip(UNREADABLE, path, f"{type(e).__name__}: {e}") from e


def _frame_attribute(ds: pydicom.Dataset, index: int, sequence: str, key: str):
    """`key` of frame `index`: its per-frame functional group, the shared one, or the top level
    (single-frame files); None when absent."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(groups)
        if not items:
            continue
        group = items[index] if groups.startswith("PerFrame") and index < len(items) else items[0]
        inner = group.get(sequence)
        if inner and key in inner[0]:
            return inner[0].get(key)
    return ds.get(key)


def _frames(path: str, ds: pydicom.Dataset) -> list[_Frame]:
    """The frames of one file, each with its geometry and rescale."""
    pixels = _pixels(path, ds, SkipVolume)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames == 1:
        pixels = pixels[None] if pixels.ndim == 2 else pixels
    if pixels.ndim != 3 or len(pixels) != n_frames:
        raise SkipVolume(UNSUPPORTED, path, f"pixel shape {pixels.shape}, expected 2D frames")
    frames = []
    for i, plane in enumerate(pixels):
        geometry = {
            key: _frame_attribute(ds, i, sequence, key)
            for sequence, key in (
                ("PlanePositionSequence", "ImagePositionPatient"),
                ("PlaneOrientationSequence", "ImageOrientationPatient"),
                ("PixelMeasuresSequence", "PixelSpacing"),
            )
        }
        missing = [key for key, value in geometry.items() if value is None]
        if missing:
            raise SkipVolume(UNREADABLE, path, f"missing {', '.join(missing)}")
        if n_frames == 1:
            hu = apply_modality_lut(plane, ds)
        else:
            slope = _frame_attribute(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _frame_attribute(
                ds, i, "PixelValueTransformationSequence", "RescaleIntercept"
            )
            hu = plane * float(1.0 if slope is None else slope) + float(intercept or 0.0)
        thickness = _frame_attribute(ds, i, "PixelMeasuresSequence", "SliceThickness")
        frames.append(
            _Frame(
                path=path,
                hu=np.asarray(hu, np.float64),
                position=np.asarray(geometry["ImagePositionPatient"], np.float64),
                orientation=np.asarray(geometry["ImageOrientationPatient"], np.float64),
                spacing=tuple(float(v) for v in geometry["PixelSpacing"]),
                thickness=float(thickness or 1.0),
            )
        )
    return frames


def canonicalize(volume: Volume, min_slices: int = 16, min_in_plane: int = 64) -> Volume:
    """Reorient to the canonical [z, y, x] order and check the volume is usable.

    Canonical orientation (radiological display convention): array index [z, y, x] with
    z = axial slice, increasing inferior -> superior; y = row, increasing anterior -> posterior;
    x = column, increasing patient right -> patient left. So `volume.hu[z]` is an axial slice
    shown as a radiologist views it (anterior at the top, patient right on the viewer's left).
    Each array axis is matched to its closest anatomical axis (small obliquity is ignored).

    Raises SkipVolume with reason
      "NaN voxels"  any voxel NaN or infinite;
      "bad affine"  the affine does not span three axes;
      "not axial"   the acquisition plane is not axial (rule in `_slice_axis`);
      "too small"   fewer than `min_slices` slices, or rows/columns fewer than `min_in_plane`.
    """
    if not np.isfinite(volume.hu).all():
        raise SkipVolume(NAN_VOXELS, volume.path)
    ornt = orientations.io_orientation(volume.affine)
    if np.isnan(ornt).any():
        raise SkipVolume(BAD_AFFINE, volume.path, f"affine {volume.affine.tolist()}")
    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt(CANONICAL_AXCODES))
    hu = orientations.apply_orientation(volume.hu, transform)
    affine = volume.affine @ orientations.inv_ornt_aff(transform, volume.hu.shape)
    canonical = dataclasses.replace(volume, hu=hu, affine=affine)
    too_small = hu.shape[0] < min_slices or min(hu.shape[1:]) < min_in_plane
    # A handful of slices has no plane to judge: say it is too small before "not axial".
    if too_small and min(hu.shape) < min_slices:
        raise _too_small(volume, hu.shape, min_slices, min_in_plane)
    slice_axis = _slice_axis(canonical.spacing)
    if slice_axis not in (None, 0):
        spacing = ", ".join(f"{s:.3g}" for s in canonical.spacing)
        raise SkipVolume(NOT_AXIAL, volume.path, f"S-P-L spacing {spacing} mm")
    if too_small:
        raise _too_small(volume, hu.shape, min_slices, min_in_plane)
    return canonical


def _too_small(
    volume: Volume, shape: tuple[int, ...], min_slices: int, min_in_plane: int
) -> SkipVolume:
    found = f"; the folder holds {'; '.join(volume.series)}" if volume.series else ""
    return SkipVolume(
        TOO_SMALL,
        volume.path,
        f"canonical shape {shape}, at least {min_slices} slices of {min_in_plane} x "
        f"{min_in_plane} needed{found}",
    )


def _slice_axis(spacing: np.ndarray) -> int | None:
    """The acquisition's through-plane axis, inferred from voxel spacing alone.

    CT pixels are square, so the two in-plane axes are the pair with the closest spacings and
    the slice axis is the odd one out: the largest spacing when its ratio to the middle one
    exceeds the middle-to-smallest ratio (thick slices), else the smallest (thin slices under
    coarser pixels, e.g. 0.6 mm slices of 0.9 mm pixels). This is how a sagittal or coronal
    acquisition is told apart after reorientation. Returns None for isotropic voxels (all
    within 1%): every plane then samples the anatomy equally well.
    """
    small, mid, large = np.sort(spacing)
    if large <= small * _ISOTROPIC_RATIO:
        return None
    thick_slices = large / mid > mid / small
    return int(np.argmax(spacing) if thick_slices else np.argmin(spacing))


def resize_volume(
    hu: np.ndarray, shape: Sequence[int] = (32, 128, 128), antialias: bool = True
) -> np.ndarray:
    """Resample a volume to `shape` (float32), separably per axis, ignoring physical spacing.

    Uses voxel-centre alignment (as PIL and torch with align_corners=False). Shrinking an axis
    averages the covered input voxels (area weights; a 4x in-plane or ~10x through-plane
    reduction would otherwise alias badly); enlarging, or `antialias=False`, is linear, which
    together is trilinear interpolation. Each axis is one matrix product (BLAS).
    """
    out = np.asarray(hu, dtype=np.float32)
    factors = [out.shape[a] / n for a, n in enumerate(shape)]
    for axis in (int(a) for a in np.argsort(factors)[::-1]):  # most-reduced axis first
        n_in, n_out = out.shape[axis], int(shape[axis])
        if n_out != n_in:
            weights = _resize_weights(n_in, n_out, area=antialias and n_out < n_in)
            out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out)


def _resize_weights(n_in: int, n_out: int, area: bool) -> np.ndarray:
    """[n_out, n_in] weights of a 1D resize: box overlaps (area) or linear at voxel centres."""
    scale = n_in / n_out
    if area:
        start = np.arange(n_out)[:, None] * scale
        j = np.arange(n_in)[None, :]
        overlap = np.minimum(start + scale, j + 1) - np.maximum(start, j)
        return (np.clip(overlap, 0.0, None) / scale).astype(np.float32)
    pos = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    rows = np.arange(n_out)
    weights = np.zeros((n_out, n_in), np.float32)
    weights[rows, lo] = 1.0 - frac
    weights[rows, np.minimum(lo + 1, n_in - 1)] += frac  # at the last voxel frac is 0
    return weights


def to_stored_hu(hu: np.ndarray) -> np.ndarray:
    """Round HU to int16, the storage form of prepared volumes (half the bytes of float32)."""
    info = np.iinfo(np.int16)
    return np.clip(np.rint(hu), info.min, info.max).astype(np.int16)


def prepare_volume(
    volume: Volume,
    shape: Sequence[int] = (32, 128, 128),
    min_slices: int = 16,
    min_in_plane: int = 64,
    antialias: bool = True,
) -> np.ndarray:
    """Builder step: canonicalize, check and resize a read volume -> int16 HU of `shape`."""
    canonical = canonicalize(volume, min_slices=min_slices, min_in_plane=min_in_plane)
    return to_stored_hu(resize_volume(canonical.hu, shape, antialias=antialias))


def window_hu(hu: np.ndarray, window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Clip HU to `window` = (low, high) and scale it to float32 [0, 1]."""
    low, high = window
    if high <= low:
        raise ValueError(f"HU window {window} must have low < high")
    out = np.asarray(hu, dtype=np.float32) - np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


HU, AUTO = "hu", "auto"
WINDOWED = "windowed:"  # + the value that stands for the window's top, e.g. "windowed:255"


def check_intensity(intensity: str) -> None:
    """Raise ValueError unless `intensity` is "auto", "hu" or "windowed:MAX" (MAX > 0)."""
    if intensity in (AUTO, HU):
        return
    top = intensity.removeprefix(WINDOWED)
    try:
        if intensity.startswith(WINDOWED) and float(top) > 0:
            return
    except ValueError:
        pass
    raise ValueError(
        f"intensity {intensity!r}: give 'auto' (Hounsfield units, refused when they cannot be), "
        "'hu' (Hounsfield units, unchecked) or 'windowed:MAX' (0..MAX spans the run's window)"
    )


def as_hounsfield(
    volume: Volume, intensity: str = AUTO, window: tuple[float, float] = (-1000.0, 1000.0)
) -> Volume:
    """The volume in HU as `intensity` states its values are.

    "windowed:MAX": 0..MAX spans the HU `window` (an export already windowed, e.g. 8-bit at
    MAX 255): mapped linearly back onto it, so the window gives v / MAX as training's would.
    "hu": taken as HU. "auto": HU, refused (SkipVolume "not Hounsfield units", a paragraph
    saying what was found and what to pass) when they cannot be: an MR series, or values
    within 0..4095, none negative, with no rescale tags (air is -1000 HU in a CT).
    """
    check_intensity(intensity)
    low, high = window
    if intensity.startswith(WINDOWED):
        scale = (high - low) / float(intensity.removeprefix(WINDOWED))
        return dataclasses.replace(volume, hu=(low + volume.hu * np.float32(scale)))
    if intensity == HU:
        return volume
    lo, hi = float(volume.hu.min()), float(volume.hu.max())
    if volume.modality == "MR":
        found = "an MR series (Modality MR), whose values are no Hounsfield units"
    elif lo >= 0 and hi <= 4095 and not volume.rescaled:
        found = f"values {lo:g} to {hi:g}, none negative, and no rescale to Hounsfield units"
    else:
        return volume
    top = 1 if hi <= 1 else 255 if hi <= 255 else 4095
    raise SkipVolume(
        NOT_HU,
        volume.path,
        f"{found}: air is -1000 HU in a CT, and the run's window ({low:g} to {high:g} HU) "
        f"would turn this into near-constant grey. If the values are already windowed, 0 to "
        f"{top} spanning that window, say so: embed --ct_intensity=windowed:{top}, or "
        f"read_volume(path, intensity='windowed:{top}'); if they are Hounsfield units after "
        "all, --ct_intensity=hu (intensity='hu')",
    )


class ExtentWarning(ReadWarning):
    """A volume whose extent or spacing is far from the whole chests the model trained on."""


# What pre-training CTs cover (chest CTs as CT-RATE holds them, and the phantoms: 300 mm
# superior-inferior, 360 mm across): a volume outside these is embedded with an ExtentWarning.
CHEST_SI_MM = (150.0, 600.0)
CHEST_ACROSS_MM = (200.0, 550.0)
MAX_SLICE_MM = 5.0


def warn_unusual_extent(canonical: Volume, shape: Sequence[int]) -> None:
    """One ExtentWarning line when a canonical volume is far from a whole chest (a crop, a
    few slices, an abdomen, thick slices): it is still resized to `shape` and embedded."""
    spacing = canonical.spacing
    extent = np.asarray(canonical.hu.shape) * spacing
    across = extent[1:]
    if (
        CHEST_SI_MM[0] <= extent[0] <= CHEST_SI_MM[1]
        and (CHEST_ACROSS_MM[0] <= across).all()
        and (across <= CHEST_ACROSS_MM[1]).all()
        and spacing[0] <= MAX_SLICE_MM
    ):
        return
    warnings.warn(
        f"{canonical.path}: {extent[0]:.0f} mm superior-inferior x {extent[1]:.0f} x "
        f"{extent[2]:.0f} mm across, {canonical.hu.shape[0]} slices {spacing[0]:.3g} mm apart; "
        f"the model trained on whole chests, {CHEST_SI_MM[0]:.0f} to {CHEST_SI_MM[1]:.0f} mm "
        f"superior-inferior, {CHEST_ACROSS_MM[0]:.0f} to {CHEST_ACROSS_MM[1]:.0f} mm across, "
        f"slices at most {MAX_SLICE_MM:g} mm apart; embedded resized to "
        f"{' x '.join(map(str, shape))} all the same",
        ExtentWarning,
        stacklevel=3,
    )
