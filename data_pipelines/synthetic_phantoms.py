"""Procedural chest phantoms: X-ray-like images and CT-like volumes with matching reports.

This is the embedded default dataset: the demo, tests and evaluation need images whose findings
are known exactly (labels, lesion slices) without downloading anything. Both modalities are
rendered from one kind of case description (anatomy + findings) so that findings look alike and
reports share their vocabulary across 2D and 3D, while the samples themselves are unpaired, as in
the paper (MIMIC-CXR vs BIMCV).

Every sample is a pure function of (seed, split, modality, index), so builds can run in parallel.
Pure numpy/scipy; never imports jax.

Patient frame, normalised to [-1, 1]: x patient right (-) to left (+), y anterior (-) to
posterior (+), z inferior (-) to superior (+). One unit is 180 mm along x and y and 150 mm along z;
the CT field of view is exactly that cube. CT arrays are [D, H, W] = [z, y, x] with index 0 at the
inferior, anterior and patient-right end. X-rays are frontal views: row 0 is superior, column 0 is
the patient's right (radiological convention).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FINDINGS: tuple[str, ...] = (
    "pleural_effusion_left",
    "pleural_effusion_right",
    "nodule",
    "consolidation",
    "ground_glass_opacity",
    "cardiomegaly",
)
"""Label vocabulary; its order is the order of the multi-hot `labels` vector."""

LOBES: tuple[str, ...] = (
    "right upper lobe",
    "right middle lobe",
    "right lower lobe",
    "left upper lobe",
    "left lower lobe",
)

MODALITIES: tuple[str, ...] = ("xray", "ct")
MM_XY = 180.0  # millimetres per normalised unit along x and y
MM_Z = 150.0  # millimetres per normalised unit along z
XRAY_HALF_HEIGHT = MM_XY / MM_Z  # z half-extent of the square X-ray field (square pixels)

HU_AIR, HU_FAT, HU_SOFT, HU_LUNG = -1000.0, -100.0, 40.0, -850.0
HU_BONE, HU_MARROW, HU_DISC, HU_FLUID = 700.0, 300.0, 80.0, 15.0

_LUNG_GAP = 0.85  # X-ray: attenuation lost where tissue is replaced by aerated lung
_RIGHT, _LEFT = 0, 1
_SIDE_NAMES = ("right", "left")
# Effusion severity -> (fluid top above the dome, fraction of the lung depth filled at the base).
_EFFUSIONS = {"small": (0.12, 0.45), "moderate": (0.28, 0.7), "large": (0.5, 0.95)}
_LOBE_FINDINGS = ("nodule", "consolidation", "ground_glass_opacity")
# Lung-lesion sizes in mm: nodule diameters (whole mm); for patches, the radii of their blobs.
# "lobar": patches fill much of a demo 3D token (2x16x16 voxels, 37.5x90x90 mm), so the coarse
# tokens carry them (docs/benchmarks.md, "Why a lung window"). "small": a lung lesion covers a
# third to most of a demo slice token (8x8 pixels of one slice, 45x45x18.75 mm) but a fifth or
# less of a 3D token, so a full-resolution slice shows what the 3D tokens dilute (the "slices that
# matter" setting of the ablation, docs/benchmarks.md).
LESION_SIZES: dict[str, dict[str, tuple[float, float]]] = {
    "lobar": {
        "nodule": (12, 30),
        "consolidation": (30.0, 50.0),
        "ground_glass_opacity": (35.0, 60.0),
    },
    "small": {
        "nodule": (30, 45),
        "consolidation": (20.0, 30.0),
        "ground_glass_opacity": (20.0, 35.0),
    },
}


@dataclass(frozen=True)
class PhantomConfig:
    """What to generate; (seed, split) select an independent stream of samples."""

    image_size: int = 256  # side of the square X-ray (already letterboxed: no resize needed)
    volume_shape: tuple[int, int, int] = (32, 128, 128)  # CT [D, H, W] over a 300x360x360 mm box
    normal_fraction: float = 0.3  # share of samples without any finding
    max_findings: int = 2  # abnormal samples carry 1..max_findings distinct findings
    lesions: str = "lobar"  # lung-lesion sizes, a key of LESION_SIZES
    seed: int = 0
    split: str = "train"

    def __post_init__(self) -> None:
        if not 0.0 <= self.normal_fraction <= 1.0:
            raise ValueError(
                f"PhantomConfig.normal_fraction must be in [0, 1], got {self.normal_fraction}"
            )
        if not 1 <= self.max_findings <= len(FINDINGS):
            raise ValueError(
                f"PhantomConfig.max_findings must be in [1, {len(FINDINGS)}], "
                f"got {self.max_findings}"
            )
        if self.lesions not in LESION_SIZES:
            raise ValueError(
                f"PhantomConfig.lesions must be one of {tuple(LESION_SIZES)}, got {self.lesions!r}"
            )
        if self.image_size < 16 or len(self.volume_shape) != 3 or min(self.volume_shape) < 8:
            raise ValueError(
                "PhantomConfig: image_size must be >= 16 and volume_shape three "
                f"sizes >= 8, got {self.image_size} and {self.volume_shape}"
            )


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in the patient frame, rotated by `angle` (radians) in the axial plane."""

    center: tuple[float, float, float]  # z, y, x
    radii: tuple[float, float, float]  # z, y, x
    angle: float = 0.0

    def q_axial(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """In-plane part of the normalised squared radius."""
        dy, dx = y - self.center[1], x - self.center[2]
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = c * dx + s * dy, c * dy - s * dx
        return (u / self.radii[2]) ** 2 + (v / self.radii[1]) ** 2

    def q_z(self, z: np.ndarray) -> np.ndarray:
        return ((z - self.center[0]) / self.radii[0]) ** 2

    def chord_y(self, z: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Length of the antero-posterior ray through the ellipsoid at (z, x): an X-ray path."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        ry, rx = self.radii[1], self.radii[2]
        dx = x - self.center[2]
        a = s * s / rx**2 + c * c / ry**2
        b = dx * (c * s / rx**2 - c * s / ry**2)
        g = dx * dx * (c * c / rx**2 + s * s / ry**2) + self.q_z(z) - 1.0
        return 2.0 * np.sqrt(np.maximum(b * b - a * g, 0.0)) / a


@dataclass(frozen=True)
class Lung:
    """One lung: an elliptic column tapering to the apex, cut from below by a diaphragm dome."""

    cx: float
    cy: float
    rx: float
    ry: float
    z_apex: float
    z_taper: float
    dome_top: float
    dome_depth: float

    def q_axial(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return ((x - self.cx) / self.rx) ** 2 + ((y - self.cy) / self.ry) ** 2

    def profile2(self, z: np.ndarray) -> np.ndarray:
        """Squared in-plane scale at height z: 1 at the base, 0 at the apex."""
        t = np.maximum(z - self.z_taper, 0.0) / (self.z_apex - self.z_taper)
        return np.maximum(1.0 - t * t, 0.0)

    def dome(self, q_axial: np.ndarray) -> np.ndarray:
        """Height of the diaphragm under the lung, lowest at the costophrenic recesses."""
        return self.dome_top - self.dome_depth * q_axial

    def inside(self, z: np.ndarray, q_axial: np.ndarray) -> np.ndarray:
        return (q_axial <= self.profile2(z)) & (z >= self.dome(q_axial))

    def chord_y(self, z: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Exact antero-posterior path through the lung: the rays low in the chest only cross
        the posterior and lateral recesses behind the dome."""
        qx = ((x - self.cx) / self.rx) ** 2
        p2 = self.profile2(z)
        t = np.minimum(np.maximum((self.dome_top - z) / self.dome_depth, 0.0), p2)
        outer = np.sqrt(np.maximum(p2 - qx, 0.0))
        return 2.0 * self.ry * (outer - np.sqrt(np.maximum(t - qx, 0.0)))


@dataclass(frozen=True)
class Anatomy:
    """Per-sample normal anatomy; renderers add findings on top."""

    shift: tuple[float, float, float]  # z, y, x offset of the patient in the field of view
    tilt: float  # radians: about z for CT, in the image plane for X-rays
    body: tuple[float, float]  # y, x half-axes of the torso
    fat: float  # subcutaneous fat thickness as a fraction of the torso radius
    lungs: tuple[Lung, Lung]  # right, left
    heart: Ellipsoid
    spine: tuple[float, float]  # y centre and radius of the vertebral bodies
    rib_phase: float
    oblique_fissure: tuple[float, float]  # height at the lung centre, slope per lung half-depth
    horizontal_fissure: float  # height of the right minor fissure
    noise: float  # CT noise in HU before in-plane blur; the X-ray uses it / 2000
    exposure: float  # X-ray contrast jitter around 1


@dataclass(frozen=True)
class Finding:
    """One abnormality, with every parameter the renderers and the report need."""

    name: str
    side: int | None = None
    lobe: str | None = None
    severity: str | None = None
    size_mm: int | None = None
    blobs: tuple[Ellipsoid, ...] = ()
    level: float = 0.0  # effusions: height of the fluid top
    fill: float = 0.0  # effusions: fraction of the lung depth filled at the base


@dataclass(frozen=True)
class Case:
    """Everything that determines one sample; rendering and reporting are pure functions of it."""

    modality: str
    anatomy: Anatomy
    findings: tuple[Finding, ...]
    noise_seed: int

    @property
    def labels(self) -> np.ndarray:
        """Multi-hot float32 vector over FINDINGS."""
        out = np.zeros(len(FINDINGS), np.float32)
        for f in self.findings:
            out[FINDINGS.index(f.name)] = 1.0
        return out


def _ramp(t: np.ndarray) -> np.ndarray:
    """Soft edge: 0 below 0, 1 above 1, linear between (cheap enough for every pixel)."""
    return np.clip(t, 0.0, 1.0)


def _streams(index: int, cfg: PhantomConfig, modality: str) -> list[np.random.SeedSequence]:
    """Independent case / noise / text streams keyed on (seed, split, modality, index)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    key = [cfg.seed, zlib.crc32(cfg.split.encode()), MODALITIES.index(modality), index]
    return np.random.SeedSequence(key).spawn(3)


def _sample_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    body = (u(0.56, 0.66), u(0.84, 0.94))
    lungs = []
    for side in (_RIGHT, _LEFT):
        sign = 1.0 if side == _LEFT else -1.0
        lungs.append(
            Lung(
                cx=sign * u(0.40, 0.46),
                cy=u(0.0, 0.08),
                rx=u(0.27, 0.31) - 0.02 * side,
                ry=u(0.42, 0.48),
                z_apex=u(0.76, 0.84),
                z_taper=u(-0.1, 0.15),
                dome_top=u(-0.38, -0.28) - 0.08 * side,
                dome_depth=u(0.25, 0.35),
            )
        )
    heart = Ellipsoid(
        center=(u(-0.32, -0.22), u(-0.2, -0.12), u(0.08, 0.14)),
        radii=(u(0.25, 0.3), u(0.22, 0.26), u(0.29, 0.33)),
        angle=-u(0.35, 0.6),
    )
    return Anatomy(
        shift=(u(-0.04, 0.04), u(-0.05, 0.05), u(-0.05, 0.05)),
        tilt=math.radians(u(-4.0, 4.0)),
        body=body,
        fat=u(0.04, 0.1),
        lungs=(lungs[0], lungs[1]),
        heart=heart,
        spine=(u(0.40, 0.45), u(0.10, 0.12)),
        rib_phase=u(0.0, 1.0),
        oblique_fissure=(u(-0.1, 0.0), u(0.3, 0.4)),
        horizontal_fissure=u(0.0, 0.1),
        noise=u(25.0, 60.0),
        exposure=u(0.9, 1.1),
    )


def _in_lobe(anat: Anatomy, lobe: str, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Lobe membership by fissure planes (not lung membership): the oblique fissure runs from
    posterior-superior to anterior-inferior, the right minor fissure is horizontal."""
    side = _RIGHT if lobe.startswith("right") else _LEFT
    lung = anat.lungs[side]
    z0, slope = anat.oblique_fissure
    lower = z < z0 + slope * (y - lung.cy) / lung.ry
    if lobe.endswith("lower lobe"):
        return lower
    if lobe == "right upper lobe":
        return ~lower & (z >= anat.horizontal_fissure)
    if lobe == "right middle lobe":
        return ~lower & (z < anat.horizontal_fissure)
    return ~lower


def _sample_in_lobe(rng: np.random.Generator, anat: Anatomy, lobe: str) -> tuple[float, ...]:
    """A point well inside the lobe and away from the heart, far enough from every boundary to
    survive voxel snapping."""
    lung = anat.lungs[_RIGHT if lobe.startswith("right") else _LEFT]
    margin, n = 0.09, 256
    for _ in range(100):
        z = rng.uniform(lung.dome_top - lung.dome_depth, lung.z_apex, n)
        y = rng.uniform(lung.cy - lung.ry, lung.cy + lung.ry, n)
        x = rng.uniform(lung.cx - lung.rx, lung.cx + lung.rx, n)
        q = lung.q_axial(y, x)
        ok = (q <= 0.5 * lung.profile2(z + margin)) & (z - margin >= lung.dome(q))
        ok &= _in_lobe(anat, lobe, z - margin, y) & _in_lobe(anat, lobe, z + margin, y)
        ok &= anat.heart.q_axial(y, x) + anat.heart.q_z(z) > 1.6
        if ok.any():
            i = int(np.argmax(ok))
            return float(z[i]), float(y[i]), float(x[i])
    raise RuntimeError(f"could not place a lesion in the {lobe}")


def _blobs(
    rng: np.random.Generator, center: tuple[float, ...], size_mm: tuple[float, float], count: int
) -> tuple[Ellipsoid, ...]:
    """Overlapping ellipsoids around a centre: an irregular, patchy opacity."""
    scale = np.array([MM_Z, MM_XY, MM_XY])
    out = []
    for i in range(count):
        radii = rng.uniform(*size_mm, 3) / scale
        offset = np.zeros(3) if i == 0 else rng.normal(0.0, 0.5, 3) * radii
        c = np.asarray(center) + offset
        out.append(Ellipsoid(tuple(c.tolist()), tuple(radii.tolist()), rng.uniform(0.0, math.pi)))
    return tuple(out)


def _sample_finding(
    rng: np.random.Generator, anat: Anatomy, name: str, lobe: str | None, lesions: str
) -> Finding:
    """Geometry and wording parameters of one finding; `lobe` is set for lung lesions, whose
    sizes `lesions` picks from LESION_SIZES."""
    if name.startswith("pleural_effusion"):
        side = _LEFT if name.endswith("left") else _RIGHT
        severity = str(rng.choice(list(_EFFUSIONS)))
        height, fill = _EFFUSIONS[severity]
        level = anat.lungs[side].dome_top + height + rng.uniform(0.0, 0.06)
        return Finding(name, side=side, severity=severity, level=level, fill=fill)
    if name == "cardiomegaly":
        scale = rng.uniform(1.3, 1.55)
        h = anat.heart
        center = (h.center[0] - 0.03, h.center[1], h.center[2] + 0.1 * (scale - 1.0))
        radii = (h.radii[0] * (1 + (scale - 1) / 2), h.radii[1] * scale, h.radii[2] * scale)
        severity = "mild" if scale < 1.42 else "moderate"
        return Finding(name, severity=severity, blobs=(Ellipsoid(center, radii, h.angle),))
    assert lobe is not None
    side = _RIGHT if lobe.startswith("right") else _LEFT
    center = _sample_in_lobe(rng, anat, lobe)
    low, high = LESION_SIZES[lesions][name]
    if name == "nodule":
        size = int(rng.integers(low, high + 1))
        r = size / 2.0
        sphere = Ellipsoid(center, (r / MM_Z, r / MM_XY, r / MM_XY))
        return Finding(name, side=side, lobe=lobe, size_mm=size, blobs=(sphere,))
    blobs = _blobs(rng, center, (low, high), int(rng.integers(2, 4)))
    return Finding(name, side=side, lobe=lobe, blobs=blobs)


def sample_case(index: int, cfg: PhantomConfig, modality: str) -> Case:
    """The anatomy and findings of sample `index`; deterministic in (cfg.seed, cfg.split)."""
    case_seq, noise_seq, _ = _streams(index, cfg, modality)
    rng = np.random.default_rng(case_seq)
    anat = _sample_anatomy(rng)
    findings: list[Finding] = []
    if rng.uniform() >= cfg.normal_fraction:
        count = int(rng.integers(1, cfg.max_findings + 1))
        names = rng.choice(len(FINDINGS), size=count, replace=False)
        lobes = iter(rng.permutation(LOBES))
        for k in sorted(names):
            name = FINDINGS[k]
            lobe = str(next(lobes)) if name in _LOBE_FINDINGS else None
            findings.append(_sample_finding(rng, anat, name, lobe, cfg.lesions))
    return Case(modality, anat, tuple(findings), int(noise_seq.generate_state(1)[0]))


# --------------------------------------------------------------------------- CT rendering


@dataclass
class _Grid:
    """Voxel-centre coordinates of a CT volume in the (tilted, shifted) patient frame."""

    z: np.ndarray  # [D]
    y: np.ndarray  # [H, W]
    x: np.ndarray  # [H, W]
    shape: tuple[int, int, int]

    @classmethod
    def make(cls, anat: Anatomy, shape: tuple[int, int, int]) -> _Grid:
        zg, yg, xg = (
            np.linspace(-1, 1, n, endpoint=False, dtype=np.float32) + 1.0 / n for n in shape
        )
        dz, dy, dx = anat.shift
        c, s = math.cos(anat.tilt), math.sin(anat.tilt)
        yy, xx = yg[:, None] - dy, xg[None, :] - dx
        return cls(zg - dz, c * yy - s * xx, c * xx + s * yy, shape)

    def snap(self, center: tuple[float, ...]) -> tuple[float, float, float]:
        """The voxel centre nearest to a point, so that even a tiny lesion covers a voxel."""
        k = int(np.argmin(np.abs(self.z - center[0])))
        d2 = (self.y - center[1]) ** 2 + (self.x - center[2]) ** 2
        r, c = np.unravel_index(int(np.argmin(d2)), d2.shape)
        return float(self.z[k]), float(self.y[r, c]), float(self.x[r, c])


def _box2d(mask: np.ndarray) -> tuple[slice, slice] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _z_range(grid: _Grid, lo: float, hi: float) -> slice:
    ks = np.flatnonzero((grid.z > lo) & (grid.z < hi))
    return slice(ks[0], ks[-1] + 1) if ks.size else slice(0, 0)


def _ellipsoid_region(grid: _Grid, e: Ellipsoid) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """(box, mask within box) of the voxels inside an ellipsoid."""
    qa = e.q_axial(grid.y, grid.x)
    box = _box2d(qa <= 1.0)
    qz = e.q_z(grid.z)
    ks = np.flatnonzero(qz <= 1.0)
    if box is None or ks.size == 0:
        return None
    kz = slice(ks[0], ks[-1] + 1)
    return (kz, *box), qa[box][None] + qz[kz, None, None] <= 1.0


def _vessels(anat: Anatomy) -> tuple[tuple[float, ...], ...]:
    """Vertical tubes as (y, x, radius, z_low, z_high, HU): trachea, ascending and descending
    aorta. They make mediastinal slices recognisable."""
    sy, sr = anat.spine
    top = anat.heart.center[0] + anat.heart.radii[0]
    return (
        (sy - sr - 0.14, 0.0, 0.055, 0.2, 1.0, HU_AIR),
        (anat.heart.center[1] + 0.05, -0.02, 0.07, top - 0.05, 0.45, HU_SOFT),
        (sy - sr - 0.02, 0.1, 0.06, -0.7, 0.45, HU_SOFT),
    )


def _paint_anatomy(anat: Anatomy, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """HU volume of the normal chest and a lung label map (0 none, 1 right, 2 left)."""
    by, bx = anat.body
    qb = (grid.y / by) ** 2 + (grid.x / bx) ** 2
    axial = np.where(qb <= 1.0, HU_SOFT, HU_AIR).astype(np.float32)
    axial[(qb > (1.0 - anat.fat) ** 2) & (qb <= 1.0)] = HU_FAT
    mediastinum = ((grid.y + 0.05) / 0.4) ** 2 + (grid.x / 0.22) ** 2 <= 1.0
    vol = np.broadcast_to(axial, grid.shape).copy()
    vol[_z_range(grid, -0.6, 0.75)][:, mediastinum] = HU_FAT
    lung_label = np.zeros(grid.shape, np.uint8)
    for side, lung in enumerate(anat.lungs):
        qa = lung.q_axial(grid.y, grid.x)
        box = _box2d(qa <= 1.0)
        assert box is not None
        z = grid.z[:, None, None]
        mask = lung.inside(z, qa[box][None])
        vol[:, box[0], box[1]][mask] = HU_LUNG
        lung_label[:, box[0], box[1]][mask] = side + 1
    pericardium = dataclasses.replace(anat.heart, radii=tuple(r + 0.03 for r in anat.heart.radii))
    for organ, hu in ((pericardium, HU_FAT), (anat.heart, HU_SOFT)):
        region = _ellipsoid_region(grid, organ)
        if region is not None:
            box, mask = region
            vol[box][mask] = hu
            lung_label[box][mask] = 0
    for y, x, r, z0, z1, hu in _vessels(anat):
        inside = (grid.y - y) ** 2 + (grid.x - x) ** 2 <= r * r
        kz = _z_range(grid, z0, z1)
        vol[kz][:, inside] = hu
        lung_label[kz][:, inside] = 0
    _paint_bones(anat, grid, vol)
    return vol, lung_label


def _paint_bones(anat: Anatomy, grid: _Grid, vol: np.ndarray) -> None:
    """Vertebrae with discs, neural arch, sternum and ribs (as they cross axial slices)."""
    sy, sr = anat.spine
    disc = np.abs(((grid.z * MM_Z / 25.0 + anat.rib_phase) % 1.0) - 0.5) > 0.4
    d2 = (grid.y - sy) ** 2 + grid.x**2
    vol[:, d2 <= sr**2] = np.where(disc, HU_DISC, HU_MARROW)[:, None]
    vol[:, (d2 > sr**2) & (d2 <= (sr + 0.015) ** 2)] = HU_BONE
    ca2 = (grid.y - sy - sr - 0.06) ** 2 + grid.x**2
    vol[:, (ca2 > 0.05**2) & (ca2 <= 0.08**2)] = HU_BONE
    vol[:, ca2 <= 0.05**2] = HU_FLUID
    by, bx = anat.body
    sternum = ((grid.y + by * (0.9 - anat.fat)) / 0.03) ** 2 + (grid.x / 0.08) ** 2 <= 1.0
    vol[_z_range(grid, -0.5, 0.75)][:, sternum] = HU_BONE
    qb = np.sqrt((grid.y / by) ** 2 + (grid.x / bx) ** 2)
    shell = (qb > 0.8 - anat.fat) & (qb <= 0.86 - anat.fat)
    theta = np.arctan2(grid.x[shell], -grid.y[shell])  # 0 anterior, +-pi posterior
    rib_z = (grid.z[:, None] + 0.35 * np.cos(theta)[None]) * MM_Z  # ribs slope down anteriorly
    rib = (((rib_z / 24.0 + anat.rib_phase) % 1.0) < 0.4) & (grid.z[:, None] > -0.7)
    rib &= grid.z[:, None] < 0.95
    vol[:, shell] = np.where(rib, HU_BONE, vol[:, shell])


def _lobe_target(
    case: Case, f: Finding, grid: _Grid, box: tuple[slice, ...], lung_label: np.ndarray
) -> np.ndarray:
    """Voxels of a box that a finding may turn abnormal: still-aerated lung, in its lobe."""
    if f.lobe is None:
        return lung_label[box] > 0
    z = grid.z[box[0]][:, None, None]
    return (lung_label[box] == f.side + 1) & _in_lobe(case.anatomy, f.lobe, z, grid.y[box[1:]])


def _finding_regions(
    case: Case, f: Finding, grid: _Grid, lung_label: np.ndarray
) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """(box, mask) pieces of one finding, clipped to the lung it affects."""
    if f.name.startswith("pleural_effusion"):
        lung = case.anatomy.lungs[f.side]
        kz = _z_range(grid, -2.0, f.level)
        z = grid.z[kz][:, None, None]
        frac = np.clip((f.level - z) / (f.level - lung.dome(1.0)), 0.0, 1.0)
        y_level = lung.cy + lung.ry * (1.0 - 2.0 * f.fill * frac)
        box = (kz, slice(None), slice(None))
        return [(box, (lung_label[kz] == f.side + 1) & (grid.y[None] >= y_level))]
    pieces = []
    for i, blob in enumerate(f.blobs):
        if i == 0 and f.lobe is not None:
            blob = dataclasses.replace(blob, center=grid.snap(blob.center))
        region = _ellipsoid_region(grid, blob)
        if region is not None:
            box, mask = region
            pieces.append((box, mask & _lobe_target(case, f, grid, box, lung_label)))
    return pieces


def _finding_hu(f: Finding, piece: int) -> float:
    """Density of a finding; ground glass varies by patch so it looks mottled."""
    if f.name.startswith("pleural_effusion"):
        return HU_FLUID
    if f.name == "ground_glass_opacity":
        return -560.0 + 90.0 * (piece % 3)
    return {"nodule": 45.0, "consolidation": 25.0, "cardiomegaly": HU_SOFT}[f.name]


def render_ct(case: Case, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (int16 [D, H, W]) and the exact boolean mask of abnormal voxels.

    Findings only ever replace aerated lung voxels, each with a density unlike lung, and the blur
    acts within slices, so the slices touched by the mask are exactly the slices that change.
    """
    grid = _Grid.make(case.anatomy, shape)
    vol, lung_label = _paint_anatomy(case.anatomy, grid)
    lesion = np.zeros(shape, bool)
    for f in case.findings:
        pieces = _finding_regions(case, f, grid, lung_label)
        for i, (box, mask) in enumerate(pieces):
            vol[box][mask] = _finding_hu(f, i)
            lesion[box] |= mask
        for box, mask in pieces:
            lung_label[box][mask] = 0
    rng = np.random.default_rng(case.noise_seed)
    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(case.anatomy.noise)
    vol = ndimage.gaussian_filter(vol, sigma=(0.0, 0.7, 0.7), truncate=3.0)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16), lesion


# --------------------------------------------------------------------------- X-ray rendering


def _xray_coords(anat: Anatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient (z, x) of every pixel of a frontal view, tilted in the image plane."""
    g = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    dz, _, dx = anat.shift
    c, s = math.cos(anat.tilt), math.sin(anat.tilt)
    xx, zz = g[None, :] - dx, -g[:, None] * XRAY_HALF_HEIGHT - dz
    return c * zz + s * xx, c * xx - s * zz


def _blob_chord(f: Finding, z: np.ndarray, x: np.ndarray) -> np.ndarray:
    return sum(b.chord_y(z, x) for b in f.blobs)


def _aerated_path(case: Case, z: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Antero-posterior path through aerated lung, after the heart and findings displace it."""
    a = case.anatomy
    lungs = [lung.chord_y(z, x) for lung in a.lungs]
    heart = a.heart
    for f in case.findings:
        if f.name.startswith("pleural_effusion"):
            lung = a.lungs[f.side]
            meniscus = 0.1 * ((x - lung.cx) / lung.rx) ** 2
            lungs[f.side] = lungs[f.side] * (1.0 - _ramp((f.level + meniscus - z) / 0.06))
        elif f.name == "cardiomegaly":
            heart = f.blobs[0]
    air = lungs[0] + lungs[1]
    for f in case.findings:
        strength = {"nodule": 1.0, "consolidation": 0.9, "ground_glass_opacity": 0.55}.get(f.name)
        if strength is not None:
            air = air - strength * np.minimum(_blob_chord(f, z, x), air)
    return air - np.minimum(heart.chord_y(z, x), air)


def _nodule_path(case: Case, z: np.ndarray, x: np.ndarray) -> np.ndarray | float:
    """Extra density of nodules beyond the lung they displace, so that a 12 mm nodule still
    shows on a 64-pixel radiograph."""
    return sum((2.0 * _blob_chord(f, z, x) for f in case.findings if f.name == "nodule"), 0.0)


def _bone_path(anat: Anatomy, z: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Spine with disc spaces, posterior ribs curving down laterally, and clavicles."""
    sr = anat.spine[1]
    bx = anat.body[1]
    ax = np.abs(x)
    disc = np.abs(((z * MM_Z / 25.0 + anat.rib_phase) % 1.0) - 0.5) > 0.4
    spine = 2.0 * np.sqrt(np.maximum(sr * sr - x * x, 0.0)) * (1.0 - np.float32(0.45) * disc)
    phase = (z * MM_Z + 70.0 * (ax / bx) ** 2) / 24.0 + anat.rib_phase
    band = _ramp((0.2 - np.abs(phase - np.rint(phase))) / 0.08)
    cage = np.minimum(
        np.minimum((0.85 * bx - ax) / 0.05, (ax - sr) / 0.03),
        np.minimum((z + 0.7) / 0.1, (0.95 - z) / 0.1),
    )
    clavicle = np.minimum(
        np.minimum((ax - 0.06) / 0.04, (0.68 - ax) / 0.05),
        (0.04 - np.abs(z - 0.92 - 0.15 * ax)) / 0.02,
    )
    return 1.3 * spine + 0.09 * band * _ramp(cage) + 0.16 * _ramp(clavicle)


def _soft_path(anat: Anatomy, z: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Torso (narrowing to the neck), minus the tracheal air column, plus the hilar vessels."""
    by, bx = anat.body
    neck = 1.0 - 0.55 * _ramp((z - 0.95) / 0.25)
    body = 2.0 * by * neck * np.sqrt(np.maximum(1.0 - (x / (bx * neck)) ** 2, 0.0))
    _, tx, tr, tz, _, _ = _vessels(anat)[0]
    trachea = 2.0 * np.sqrt(np.maximum(tr * tr - (x - tx) ** 2, 0.0)) * _ramp((z - tz) / 0.1)
    hila = sum(
        _ramp(1.0 - ((x - lung.cx * 0.45) / 0.12) ** 2 - ((z - 0.05) / 0.2) ** 2) ** 2
        for lung in anat.lungs
    )
    return body - 0.9 * trachea + 0.12 * hila


def render_xray(case: Case, size: int) -> np.ndarray:
    """Frontal radiograph (uint8 [size, size]): brighter where the chest attenuates more."""
    a = case.anatomy
    z, x = _xray_coords(a, size)
    path = _soft_path(a, z, x) - _LUNG_GAP * _aerated_path(case, z, x) + _bone_path(a, z, x)
    path += _nodule_path(case, z, x)
    img = 1.0 - np.exp(-1.6 * a.exposure * path)
    rng = np.random.default_rng(case.noise_seed)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(a.noise / 2000.0)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- reports

_TECHNIQUE = {
    "xray": (
        "Frontal chest radiograph.",
        "Single frontal view of the chest.",
        "PA view of the chest.",
        "Portable AP view of the chest.",
    ),
    "ct": (
        "CT of the chest without contrast.",
        "Non-contrast CT of the chest.",
        "Axial CT images of the chest were reviewed.",
        "Chest CT was performed.",
    ),
}
_POSITIVE = {
    "pleural_effusion": (
        "There is a {sev} {side} pleural effusion.",
        "A {sev} {side} pleural effusion is present.",
        "{Sev} {side}-sided pleural effusion.",
        "{Sev} {side} pleural effusion is seen.",
    ),
    "nodule": (
        "There is a {mm} mm nodule in the {lobe}.",
        "A {mm} mm pulmonary nodule is seen in the {lobe}.",
        "{Lobe} nodule measuring {mm} mm.",
        "A solid {mm} mm nodule is noted in the {lobe}.",
        "Well-circumscribed {mm} mm nodule in the {lobe}.",
    ),
    "consolidation": (
        "There is consolidation in the {lobe}.",
        "Airspace consolidation is present in the {lobe}.",
        "Focal consolidation in the {lobe}.",
        "Patchy consolidation involving the {lobe}.",
        "Dense consolidation is seen in the {lobe}.",
    ),
    "ground_glass_opacity": (
        "There are ground-glass opacities in the {lobe}.",
        "Patchy ground-glass opacity in the {lobe}.",
        "Hazy ground-glass opacity is seen in the {lobe}.",
        "Ground-glass opacity involving the {lobe}.",
    ),
    "cardiomegaly": (
        "The heart is {sev}ly enlarged.",
        "{Sev} cardiomegaly.",
        "There is {sev} cardiomegaly.",
        "Cardiomegaly is present.",
    ),
}
_POSITIVE_BY_MODALITY = {
    "xray": {
        "pleural_effusion": (
            "{Sev} {side} pleural effusion with blunting of the {side} costophrenic angle.",
        ),
        "cardiomegaly": ("The cardiac silhouette is enlarged.", "Enlarged cardiac silhouette."),
    },
    "ct": {
        "pleural_effusion": (
            "A {sev} {side} pleural effusion layers dependently at the {side} lung base.",
        ),
        "cardiomegaly": ("The heart is enlarged.", "Cardiac enlargement is noted."),
    },
}
_IMPRESSION = {
    "pleural_effusion": ("{Sev} {side} pleural effusion", "{Side} pleural effusion"),
    "nodule": ("{mm} mm {lobe} nodule", "{Lobe} pulmonary nodule measuring {mm} mm"),
    "consolidation": ("{Lobe} consolidation", "Consolidation in the {lobe}"),
    "ground_glass_opacity": ("Ground-glass opacity in the {lobe}", "{Lobe} ground-glass opacity"),
    "cardiomegaly": ("Cardiomegaly", "{Sev} cardiomegaly"),
}
_NEGATIVE = {
    "effusions": (
        "No pleural effusion.",
        "There is no pleural effusion.",
        "No pleural effusions are seen.",
    ),
    "one_effusion": ("No {side} pleural effusion.", "There is no {side} pleural effusion."),
    "nodule": (
        "No pulmonary nodules.",
        "No suspicious pulmonary nodule or mass.",
        "There is no pulmonary nodule.",
    ),
    "consolidation": (
        "No focal consolidation.",
        "There is no consolidation.",
        "No airspace consolidation.",
    ),
    "ground_glass_opacity": ("No ground-glass opacity.", "There are no ground-glass opacities."),
    "cardiomegaly": (
        "The heart size is normal.",
        "Heart size is within normal limits.",
        "The heart is normal in size.",
    ),
    "lungs": ("The lungs are clear.", "The lungs are clear bilaterally."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "bones": ("The osseous structures are intact.", "No acute osseous abnormality."),
}
_NEGATIVE_BY_MODALITY = {
    "xray": {
        "effusions": ("The costophrenic angles are sharp.",),
        "one_effusion": ("The {side} costophrenic angle is sharp.",),
        "cardiomegaly": ("The cardiac silhouette is normal in size.",),
        "hila": ("The hilar contours are normal.", "The mediastinal contours are unremarkable."),
    },
    "ct": {
        "cardiomegaly": ("No cardiomegaly.",),
        "hila": ("No mediastinal or hilar lymphadenopathy.",),
        "airways": ("The central airways are patent.",),
    },
}
_NORMAL_IMPRESSION = {
    "xray": (
        "No acute cardiopulmonary abnormality.",
        "No acute cardiopulmonary process.",
        "Normal chest radiograph.",
    ),
    "ct": (
        "No acute cardiopulmonary abnormality.",
        "No acute intrathoracic abnormality.",
        "Normal CT of the chest.",
    ),
}
_MIN_SENTENCES = 3
_MAX_NEGATIVES = 4


def _choice(rng: np.random.Generator, pool: tuple[str, ...]) -> str:
    return str(pool[rng.integers(len(pool))])


def _template_key(f: Finding) -> str:
    return "pleural_effusion" if f.name.startswith("pleural_effusion") else f.name


def _fields(f: Finding) -> dict[str, str]:
    side = "" if f.side is None else _SIDE_NAMES[f.side]
    sev, lobe = f.severity or "", f.lobe or ""
    return {
        "side": side,
        "Side": side.capitalize(),
        "sev": sev,
        "Sev": sev.capitalize(),
        "lobe": lobe,
        "Lobe": lobe.capitalize(),
        "mm": str(f.size_mm),
    }


def _negatives(case: Case) -> list[tuple[str, dict[str, str]]]:
    """(template key, fields) of every normal statement that is true for this case."""
    present = {f.name for f in case.findings}
    absent_sides = [s for s in _SIDE_NAMES if f"pleural_effusion_{s}" not in present]
    out: list[tuple[str, dict[str, str]]] = []
    if len(absent_sides) == 2:
        out.append(("effusions", {}))
    elif absent_sides:
        out.append(("one_effusion", {"side": absent_sides[0]}))
    out += [(name, {}) for name in (*_LOBE_FINDINGS, "cardiomegaly") if name not in present]
    if not present - {"cardiomegaly"}:
        out.append(("lungs", {}))
    extra = [k for k in _NEGATIVE_BY_MODALITY[case.modality] if k not in _NEGATIVE]
    return out + [(k, {}) for k in ("pneumothorax", "bones", *extra)]


def _impression(case: Case, rng: np.random.Generator) -> str:
    if not case.findings:
        return _choice(rng, _NORMAL_IMPRESSION[case.modality])
    phrases = [
        _choice(rng, _IMPRESSION[_template_key(f)]).format(**_fields(f)) for f in case.findings
    ]
    if len(phrases) == 2 and rng.uniform() < 0.5:
        return f"{phrases[0]} and {phrases[1][0].lower()}{phrases[1][1:]}."
    return " ".join(f"{p}." for p in phrases)


def write_report(case: Case, rng: np.random.Generator) -> str:
    """Findings and impression as plain text: every finding stated positively, some true normal
    statements, varied wording and order, always at least three sentences."""
    m = case.modality
    positives = []
    for f in case.findings:
        key = _template_key(f)
        pool = _POSITIVE[key] + _POSITIVE_BY_MODALITY[m].get(key, ())
        positives.append(_choice(rng, pool).format(**_fields(f)))
    technique = [_choice(rng, _TECHNIQUE[m])] if rng.uniform() < 0.5 else []
    candidates = _negatives(case)
    need = max(_MIN_SENTENCES - 1 - len(technique) - len(positives), 0)
    count = int(rng.integers(need, max(need, _MAX_NEGATIVES) + 1))
    negatives = []
    for i in rng.permutation(len(candidates))[:count]:
        key, fields = candidates[i]
        pool = _NEGATIVE.get(key, ()) + _NEGATIVE_BY_MODALITY[m].get(key, ())
        negatives.append(_choice(rng, pool).format(**fields))
    if rng.uniform() < 0.5:
        body = positives + [negatives[i] for i in rng.permutation(len(negatives))]
    else:
        body = positives + negatives
        body = [body[i] for i in rng.permutation(len(body))]
    return " ".join([*technique, *body, _impression(case, rng)])


# --------------------------------------------------------------------------- samples


def make_xray(index: int, cfg: PhantomConfig) -> dict:
    """One X-ray sample: image (uint8 [S, S]), report, labels (float32 over FINDINGS), findings."""
    case = sample_case(index, cfg, "xray")
    text_rng = np.random.default_rng(_streams(index, cfg, "xray")[2])
    return {
        "image": render_xray(case, cfg.image_size),
        "report": write_report(case, text_rng),
        "labels": case.labels,
        "findings": [f.name for f in case.findings],
    }


def make_ct(index: int, cfg: PhantomConfig) -> dict:
    """One CT sample: volume (int16 HU [D, H, W]), report, labels, lesion_slices (bool [D]),
    findings."""
    case = sample_case(index, cfg, "ct")
    volume, lesion = render_ct(case, cfg.volume_shape)
    text_rng = np.random.default_rng(_streams(index, cfg, "ct")[2])
    return {
        "volume": volume,
        "report": write_report(case, text_rng),
        "labels": case.labels,
        "lesion_slices": lesion.any(axis=(1, 2)),
        "findings": [f.name for f in case.findings],
    }
