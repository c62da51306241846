"""TFDS builder for LUNA16: chest CT crops centred on nodule candidates, nodule or not (3D,
binary).

Task definition. The paper classifies LUNA16 "into pulmonary nodule or normal" and reports AUC
on "LUNA2016-v2", after UniMiSS; LUNA16 itself defines no scan-level label, but its
false-positive-reduction track does define one per candidate. So a record here is one
candidate of the candidates file (`candidates`, default candidates.csv; candidates_V2.csv for
the V2 list): a crop of `crop_mm` (D, H, W in mm; default 48 x 96 x 96) centred on the
candidate, in the canonical orientation of pre-training volumes, resampled to `volume_shape`
(default 32 x 128 x 128, the encoder's input: 1.5 x 0.75 x 0.75 mm voxels, about LUNA16's own
resolution) with `imaging.resize_volume`, stored as int16 HU. `label` is the file's class: 1
when the candidate lies on a nodule of 3 mm or more annotated by at least 3 of 4 radiologists,
0 otherwise (CLASS_NAMES). Every nodule candidate is kept; non-nodule ones are subsampled per
split to `negatives_per_positive` times the split's nodule candidates (seeded; default 1, a
balanced set), in file order. Parts of a crop outside the scan are filled with -1000 HU (air).

World to voxel. A candidate's coordX, coordY, coordZ are ITK world millimetres (LPS). With the
.mhd header's Offset o, ElementSpacing s and TransformMatrix D (its i-th triple is the world
direction of image axis i), voxel (i, j, k) sits at o + D diag(s) (i, j, k), so the voxel of a
world point p is diag(s)^-1 D^-1 (p - o); flipped axes (a -1 in D) are handled by the same
formula, and the crop is taken after `imaging.canonicalize`, so it looks the same whatever the
file's axis directions. The .mhd/.raw pair is read by `read_metaimage` (no SimpleITK needed).

Splits: by subset folder (one scan is in one subset): `validation_subsets` (default 8) and
`test_subsets` (default 9), the rest train; no scan is in two splits. LUNA16 does not give the
LIDC patient of a scan: `patient_id` is the seriesuid.

Records: `volume` int16 [D, H, W], `label`, `patient_id` (seriesuid), `subset`, `world_mm`
(float32 coordX, coordY, coordZ), `diameter_mm` (the annotated nodule the candidate lies in,
from annotations.csv; 0 when none) and `id` (seriesuid:row, the 0-based candidate row).
`metadata.json` (`candidates`) counts nodule and non-nodule candidates per split and how many
non-nodule ones were kept. Skipped per split and reason: outside volume (the crop misses the
scan), the volume reasons of `data_pipelines.imaging` (unreadable file, not axial, too small,
absurd size: more than `imaging.MAX_BYTES_3D` bytes of voxels, ...), path outside manual_dir (an
.mhd whose ElementDataFile is absolute or climbs out of the folder), and, under the pseudo-split
`none`, missing volume (a seriesuid with no .mhd under any subset folder).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import imaging
from data_pipelines.builders import common

VERSION = "1.0.0"
TASK = "binary"
CLASS_NAMES = ("non-nodule", "nodule")
OPTIONS = (
    "volume_shape", "crop_mm", "negatives_per_positive", "candidates", "validation_subsets",
    "test_subsets", "seed", "num_workers",
)  # fmt: skip
_RECORDED = OPTIONS[:-1]
ANNOTATIONS = "annotations.csv"
WORLD = ("coordX", "coordY", "coordZ")
PAD_HU = -1000.0
OUTSIDE_VOLUME = "outside volume"
SPLITS = ("train", "validation", "test")
LAYOUT = (
    "the LUNA16 folder with subset0/ ... subset9/ (each holding <seriesuid>.mhd and .raw), "
    "annotations.csv (seriesuid, coordX, coordY, coordZ, diameter_mm) and candidates.csv or "
    "candidates_V2.csv (seriesuid, coordX, coordY, coordZ, class)"
)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_MET_TYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2",
    "MET_INT": "i4", "MET_UINT": "u4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}  # fmt: skip


@dataclasses.dataclass(kw_only=True)
class Luna16Config(common.EvalVolumeConfig):
    """Stored shape, crop size, negative sampling, candidates file, split subsets, seed."""

    crop_mm: tuple[int, int, int] = (48, 96, 96)
    negatives_per_positive: float = 1.0
    candidates: str = "candidates.csv"
    validation_subsets: tuple[int, ...] = (8,)
    test_subsets: tuple[int, ...] = (9,)


# ------------------------------------------------------------------------------------ MetaImage


@dataclasses.dataclass(frozen=True)
class MetaHeader:
    """What a MetaImage header (.mhd / .mha) says about a 3D image's grid and its data."""

    path: str
    size: tuple[int, int, int]  # DimSize: voxels along image axes x, y, z
    spacing: np.ndarray  # ElementSpacing, mm along x, y, z
    offset: np.ndarray  # world position (mm, LPS) of voxel (0, 0, 0)
    direction: np.ndarray  # [3, 3]; column i is the world direction of image axis i
    dtype: np.dtype
    data_file: str | None  # None: the data follows the header in the same file (LOCAL)
    compressed: bool

    def world_to_voxel(self, world: Any) -> np.ndarray:
        """World mm (x, y, z; [..., 3]) -> continuous array index (z, y, x) of the data."""
        delta = np.asarray(world, np.float64) - self.offset
        ijk = np.linalg.solve(self.direction * self.spacing, delta.reshape(-1, 3).T).T
        return ijk[:, ::-1].reshape(delta.shape)

    @property
    def affine(self) -> np.ndarray:
        """Array index (z, y, x) -> RAS+ mm, the affine `imaging.Volume` holds."""
        lps = np.eye(4)
        lps[:3, :3] = (self.direction * self.spacing)[:, ::-1]
        lps[:3, 3] = self.offset
        return _LPS_TO_RAS @ lps


def read_meta_header(path: str | Path) -> MetaHeader:
    """Parse a MetaImage header; raises SkipVolume (unreadable file / unsupported image)."""
    fields, _ = _header_fields(path)

    def floats(*keys: str, default: list[float]) -> np.ndarray:
        key = next((k for k in keys if k in fields), None)
        values = [float(v) for v in fields[key].split()] if key else default
        return np.asarray(values, np.float64)

    if fields.get("ElementType") not in _MET_TYPES:
        raise imaging.SkipVolume(
            imaging.UNSUPPORTED, path, f"ElementType {fields.get('ElementType')!r}"
        )
    try:
        size = tuple(int(v) for v in fields["DimSize"].split())
        header = MetaHeader(
            path=str(path),
            size=size,
            spacing=floats("ElementSpacing", "ElementSize", default=[1.0] * 3),
            offset=floats("Offset", "Origin", "Position", default=[0.0] * 3),
            direction=floats(
                "TransformMatrix", "Rotation", "Orientation", default=list(np.eye(3).flat)
            )
            .reshape(3, 3)
            .T,
            dtype=np.dtype(_MET_TYPES[fields["ElementType"]]).newbyteorder(
                ">" if _is_true(fields, "BinaryDataByteOrderMSB", "ElementByteOrderMSB") else "<"
            ),
            data_file=None if fields["ElementDataFile"] == "LOCAL" else fields["ElementDataFile"],
            compressed=_is_true(fields, "CompressedData"),
        )
    except (KeyError, ValueError) as e:
        raise imaging.SkipVolume(imaging.UNREADABLE, path, f"bad header: {e!r}") from e
    unsupported = (
        fields.get("NDims", "3") != "3"
        or len(size) != 3
        or fields.get("ElementNumberOfChannels", "1") != "1"
        or fields.get("HeaderSize", "0") != "0"
        or "%" in (header.data_file or "")  # a file list or pattern: 2D slices
        or header.data_file == "LIST"
    )
    if unsupported or abs(np.linalg.det(header.direction)) < 1e-6:
        raise imaging.SkipVolume(imaging.UNSUPPORTED, path, f"MetaImage header {fields}")
    return header


def _header_fields(path: str | Path) -> tuple[dict[str, str], int]:
    """The header's 'Key = value' fields, and where the data starts (for LOCAL data)."""
    fields, start = {}, 0
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                start += len(raw)
                key, sep, value = raw.decode("latin-1").partition("=")
                if sep:
                    fields[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break
    except OSError as e:
        raise imaging.SkipVolume(imaging.UNREADABLE, path, str(e)) from e
    return fields, start


def _is_true(fields: dict[str, str], *keys: str) -> bool:
    return any(fields.get(k, "False").lower() == "true" for k in keys)


def read_metaimage(path: str | Path, root: str | Path | None = None) -> imaging.Volume:
    """Read a 3D MetaImage (.mhd + data file, or .mha) as float32 [z, y, x] with its RAS+
    affine; raises SkipVolume naming the file.

    The data file must lie in `root` (manual_dir; default the header's folder), judged as
    `common.within` does; the voxel bytes (and, compressed, what they expand to) must stay
    within `imaging.MAX_BYTES_3D`.
    """
    header = read_meta_header(path)
    count = int(np.prod(header.size))
    nbytes = count * header.dtype.itemsize
    if min(header.size) < 1 or nbytes > imaging.MAX_BYTES_3D:
        detail = f"DimSize {header.size}: {nbytes} bytes, limit {imaging.MAX_BYTES_3D}"
        raise imaging.SkipVolume(imaging.ABSURD_SIZE, path, detail)
    folder = Path(path).parent
    root = folder if root is None else Path(root)
    try:
        if header.data_file is None:
            data = Path(path).read_bytes()[_header_fields(path)[1] :]
        else:
            data_file = common.within(root, os.path.relpath(folder, root), header.data_file)
            if data_file is None:
                detail = f"ElementDataFile {header.data_file!r}"
                raise imaging.SkipVolume(common.PATH_OUTSIDE, path, detail)
            data = data_file.read_bytes()
        if header.compressed:
            data = zlib.decompressobj().decompress(data, nbytes)  # no more than the header says
        voxels = np.frombuffer(data, header.dtype, count=count).reshape(header.size[::-1])
    except (OSError, ValueError, zlib.error) as e:
        raise imaging.SkipVolume(imaging.UNREADABLE, path, f"{type(e).__name__}: {e}") from e
    return imaging.Volume(voxels.astype(np.float32), header.affine, str(path))


# ------------------------------------------------------------------------------------ records


@dataclasses.dataclass(frozen=True, slots=True)
class _Candidate:
    """One row of the candidates file."""

    row: int  # 0-based data row
    world: tuple[float, float, float]
    label: int
    diameter_mm: float


@dataclasses.dataclass(frozen=True, slots=True)
class _Series:
    """One scan and its kept candidates, ready for a worker."""

    seriesuid: str
    path: str
    root: str  # manual_dir, which the .mhd's data file must lie in
    subset: int
    candidates: tuple[_Candidate, ...]
    volume_shape: tuple[int, int, int]
    crop_mm: tuple[int, int, int]


def crop(volume: imaging.Volume, world: Any, crop_mm: Any, shape: Any) -> np.ndarray | None:
    """int16 HU crop of `crop_mm` (mm along the array axes) centred on the voxel nearest the
    world point `world` (LPS mm), resampled to `shape`; None when it misses the volume."""
    ras = _LPS_TO_RAS @ np.array([*world, 1.0])
    centre = (np.linalg.inv(volume.affine) @ ras)[:3]
    size = np.maximum(1, np.rint(np.asarray(crop_mm) / volume.spacing)).astype(int)
    start = np.rint(centre).astype(int) - size // 2  # snapped to the nearest voxel first
    low, high = np.maximum(start, 0), np.minimum(start + size, volume.hu.shape)
    if np.any(high <= low):
        return None
    box = np.full(size, PAD_HU, np.float32)
    box[tuple(map(slice, low - start, high - start))] = volume.hu[tuple(map(slice, low, high))]
    return imaging.to_stored_hu(imaging.resize_volume(box, shape))


def _load(series: _Series) -> list[dict | str]:
    """The records of one scan's candidates, or why each is skipped (runs in a worker)."""
    try:
        volume = imaging.canonicalize(read_metaimage(series.path, series.root))
    except imaging.SkipVolume as e:
        return [common.Skip.of(e)] * len(series.candidates)
    out: list[dict | str] = []
    for candidate in series.candidates:
        stored = crop(volume, candidate.world, series.crop_mm, series.volume_shape)
        out.append(
            OUTSIDE_VOLUME
            if stored is None
            else {
                "volume": stored,
                "label": candidate.label,
                "patient_id": series.seriesuid,
                "subset": series.subset,
                "world_mm": np.asarray(candidate.world, np.float32),
                "diameter_mm": candidate.diameter_mm,
                "id": f"{series.seriesuid}:{candidate.row}",
            }
        )
    return out


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it has annotations.csv and subset folders (else LayoutError); the
    candidates file, whose name is an option, is checked when the build reads it."""
    root = Path(manual_dir)
    common.require(root / ANNOTATIONS, root, LAYOUT)
    if not _subset_folders(root):
        raise common.LayoutError(f"no subsetN folders in {root}; expected {LAYOUT}")
    return root


def _subset_folders(root: Path) -> dict[int, Path]:
    """subset number -> its folder."""
    out = {}
    for path in root.glob("subset*"):
        match = re.fullmatch(r"subset(\d+)", path.name)
        if match and path.is_dir():
            out[int(match[1])] = path
    return out


class Luna16(common.EvalBuilder):
    """LUNA16 CT crops around nodule candidates: nodule or not."""

    RECORDED = _RECORDED
    load = staticmethod(_load)

    def _features(self) -> dict[str, Any]:
        return {
            "subset": tfds.features.Scalar(dtype=np.int32),
            "world_mm": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "diameter_mm": tfds.features.Scalar(dtype=np.float32),
        }

    def _inputs(self, root: Path) -> dict[str, list[_Series]]:
        cfg = self.builder_config
        check_manual_dir(root)
        series = _series_files(root)
        candidates, missing = _candidates(root, cfg.candidates, set(series))
        if missing:
            self.info.metadata["skipped"]["none"] = {common.MISSING_VOLUME: missing}
        split_of = {s: _split(cfg, subset) for s, (_, subset) in series.items()}
        counts, out = {}, {}
        for index, split in enumerate(SPLITS):
            rows = [(uid, c) for uid, c in candidates if split_of[uid] == split]
            if not any(c.label for _, c in rows):
                subsets = sorted(
                    {sub for uid, (_, sub) in series.items() if split_of[uid] == split}
                )
                raise common.LayoutError(
                    f"luna16: no nodule candidates in split {split!r} (its subsets with scans: "
                    f"{subsets or 'none'}); set validation_subsets / test_subsets to subsets "
                    f"present in {root}: {sorted(_subset_folders(root))}"
                )
            kept, counts[split] = _sample(rows, cfg.negatives_per_positive, (cfg.seed, index))
            by_series: dict[str, list[_Candidate]] = {}
            for uid, candidate in kept:
                by_series.setdefault(uid, []).append(candidate)
            out[split] = [
                _Series(uid, series[uid][0], str(root), series[uid][1], tuple(c),
                        cfg.volume_shape, cfg.crop_mm)
                for uid, c in by_series.items()
            ]  # fmt: skip
        self.info.metadata["candidates"] = counts
        return out


def _split(cfg: Luna16Config, subset: int) -> str:
    if subset in cfg.validation_subsets:
        return "validation"
    return "test" if subset in cfg.test_subsets else "train"


def _series_files(root: Path) -> dict[str, tuple[str, int]]:
    """seriesuid -> (.mhd path, subset), from every subsetN folder (searched recursively)."""
    out = {}
    for subset, folder in sorted(_subset_folders(root).items()):
        for path in sorted(folder.rglob("*.mhd")):
            out[path.stem] = (str(path), subset)
    return out


def _candidates(
    root: Path, name: str, available: set[str]
) -> tuple[list[tuple[str, _Candidate]], int]:
    """(seriesuid, candidate) of every row whose scan is there, in file order, with the
    diameter of the annotated nodule it lies in; and how many rows had no scan."""
    nodules: dict[str, list[tuple[np.ndarray, float]]] = {}
    for row in common.read_table(root / ANNOTATIONS, ("seriesuid", *WORLD, "diameter_mm")):
        point = np.array([float(row[c]) for c in WORLD])
        nodules.setdefault(row["seriesuid"].strip(), []).append((point, float(row["diameter_mm"])))
    table = common.require(root / name, root, LAYOUT)
    out, missing = [], 0
    for index, row in enumerate(common.read_table(table, ("seriesuid", *WORLD, "class"))):
        uid, label = row["seriesuid"].strip(), row["class"].strip()
        world = tuple(common.parse_float(row[c]) for c in WORLD)
        if label not in ("0", "1") or np.isnan(world).any():
            raise common.LayoutError(
                f"{table} line {index + 2}: class {label!r}, coordinates "
                f"{[row[c] for c in WORLD]}; expected class 0 or 1 and three numbers"
            )
        if uid not in available:
            missing += 1
            continue
        distances = [(np.linalg.norm(p - world), d) for p, d in nodules.get(uid, [])]
        inside = [(r, d) for r, d in distances if r <= d / 2]
        diameter = min(inside)[1] if inside else 0.0
        out.append((uid, _Candidate(index, world, int(label), diameter)))
    return out, missing


def _sample(
    rows: list[tuple[str, _Candidate]], ratio: float, seed: tuple[int, int]
) -> tuple[list[tuple[str, _Candidate]], dict[str, int]]:
    """All nodule rows and a seeded sample of `ratio` times as many non-nodule rows, in file
    order; with the counts."""
    negatives = [i for i, (_, c) in enumerate(rows) if c.label == 0]
    positives = len(rows) - len(negatives)
    count = min(len(negatives), round(ratio * positives))
    drawn = np.random.default_rng(seed).choice(len(negatives), count, replace=False)
    dropped = set(negatives) - {negatives[i] for i in drawn}
    counts = {"nodule": positives, "non-nodule": len(negatives), "non-nodule kept": count}
    return [r for i, r in enumerate(rows) if i not in dropped], counts


def make_builder(config_name: str, data_dir: str, **options: Any) -> Luna16:
    """A builder for config 'ct' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("luna16", options, OPTIONS)
    cfg = Luna16Config(name=config_name, **options)
    if len(cfg.crop_mm) != 3 or min(cfg.crop_mm) <= 0:
        raise ValueError(f"luna16: crop_mm={cfg.crop_mm} must be three positive sizes (D,H,W mm)")
    if cfg.negatives_per_positive < 0:
        raise ValueError(f"luna16: negatives_per_positive={cfg.negatives_per_positive} is < 0")
    if set(cfg.validation_subsets) & set(cfg.test_subsets):
        raise ValueError(
            f"luna16: validation_subsets {cfg.validation_subsets} and test_subsets "
            f"{cfg.test_subsets} overlap"
        )
    return common.array_record_builder(Luna16, Luna16Config, config_name, data_dir, options)
