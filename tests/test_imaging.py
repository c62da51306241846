"""data_pipelines.imaging: real DICOM files, synthetic NIfTI/DICOM geometry, transforms."""

import io
import re

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import set_pixel_data
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from data_pipelines import imaging


def _testdata(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not found: install the test extra (pydicom-data)"
    return path


# ---------------------------------------------------------------------------------------- 2D


def test_ct_small_reads_hu_from_slope_and_intercept():
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    volume = imaging.read_dicom_series([path])
    assert volume.hu.dtype == np.float32 and volume.hu.shape == (1, 128, 128)
    np.testing.assert_array_equal(volume.hu[0], expected)
    assert volume.hu.min() == 128 - 1024 and volume.hu.max() == 2191 - 1024
    # ImagePositionPatient is LPS; the affine is RAS+: x and y change sign.
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    np.testing.assert_allclose(volume.affine[:3, 3], [-x, -y, z])
    # No window in the header: the 2D reader scales over the image's own HU range.
    image = imaging.read_image_2d(path)
    hand = np.rint((expected - expected.min()) / (expected.max() - expected.min()) * 255)
    assert image.dtype == np.uint8
    assert np.abs(image.astype(int) - hand).max() <= 1


def test_monochrome1_chest_xray_is_windowed_and_inverted():
    path = _testdata("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float64)
    # DICOM LINEAR window (PS3.3 C.11.2.1.2.1) written out by hand, then MONOCHROME1 inverted.
    center, width = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1.0
    windowed = np.clip((raw - center) / width + 0.5, 0.0, 1.0)
    hand = np.rint((1.0 - windowed) * 255.0)
    image = imaging.read_image_2d(path)
    assert image.dtype == np.uint8 and image.shape == raw.shape
    diff = np.abs(image.astype(int) - hand)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # Inverted: the brightest output pixel is where the stored value is lowest.
    assert image.flat[np.argmin(raw)] == image.max()


def _write_xray(path, pixels, **elements):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    for key, value in elements.items():
        setattr(ds, key, value)
    set_pixel_data(ds, pixels.astype(np.uint16), "MONOCHROME2", 12)
    ds.save_as(path, enforce_file_format=True)


def test_voi_lut_sequence_maps_over_the_lut_range(tmp_path):
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4, 100, 12])  # 4 entries from stored 100, 12 bits
    item.add_new("LUTData", "US", [400, 800, 1600, 2000])
    _write_xray(
        tmp_path / "lut", np.array([[0, 100, 101], [102, 103, 4000]]), VOILUTSequence=[item]
    )
    image = imaging.read_image_2d(tmp_path / "lut")  # no extension: found by the DICM magic
    # Values below/above the LUT take its first/last entry; the LUT range 400..2000 -> 0..255.
    hand = np.rint((np.array([[400, 400, 800], [1600, 2000, 2000]]) - 400) / 1600 * 255)
    np.testing.assert_array_equal(image, hand)


def test_bad_window_is_an_unsupported_skip(tmp_path):
    _write_xray(tmp_path / "w.dcm", np.zeros((4, 4)), WindowCenter=100, WindowWidth=0)
    with pytest.raises(imaging.SkipImage, match=r"w\.dcm") as info:
        imaging.read_image_2d(tmp_path / "w.dcm")
    assert info.value.reason == imaging.UNSUPPORTED


def test_png_modes(tmp_path):
    gray = np.arange(64 * 80, dtype=np.uint8).reshape(64, 80)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(imaging.read_image_2d(tmp_path / "g.png"), gray)
    deep = np.linspace(1000, 5000, 64 * 80).reshape(64, 80).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    hand = np.rint((deep - 1000.0) / 4000.0 * 255.0)
    assert np.abs(imaging.read_image_2d(tmp_path / "d.png").astype(int) - hand).max() <= 1


def test_truncated_jpeg_is_a_named_skip(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8)).save(
        buf, format="JPEG"
    )
    path = tmp_path / "broken.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(imaging.SkipImage, match=r"broken\.jpg") as info:
        imaging.read_image_2d(path)
    assert info.value.reason == imaging.UNREADABLE
    assert info.value.path == str(path)


def test_letterbox_area_resize_and_centred_padding():
    means = np.random.default_rng(1).integers(0, 60, (256, 128)) * 4  # block means
    # Each 2x2 block holds mean + (-3, -1, 1, 3): its area average is exactly `mean`.
    offsets = np.array([[-3, -1], [1, 3]])
    image = (np.kron(means, np.ones((2, 2), int)) + np.tile(offsets, (256, 128)) + 3).astype(
        np.uint8
    )
    assert image.shape == (512, 256)
    out = imaging.letterbox(image, 256)
    assert out.shape == (256, 256) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 64:192], means + 3)
    assert not out[:, :64].any() and not out[:, 192:].any()


def test_letterbox_upsamples_small_images():
    out = imaging.letterbox(np.full((50, 100), 200, np.uint8), 256)
    np.testing.assert_array_equal(out[64:192], 200)
    assert not out[:64].any() and not out[192:].any()


# ---------------------------------------------------------------------------------------- 3D

# Canonical shape [z, y, x] and marker position near the superior, anterior, patient-right corner.
Z, Y, X = 6, 7, 8
MARKER = (Z - 2, 1, 2)


def _save_nifti(path, stored, columns, origin=(10.0, -20.0, 30.0)):
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, float).T  # column a: RAS+ step of stored array axis a
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(stored.astype(np.float32), affine), path)
    return affine


# Each case: stored array shape, RAS+ step of each stored axis, and where the marker is stored,
# written out by hand from the anatomy (R, A, S are +x, +y, +z of RAS+).
ORIENTATION_CASES = {
    # i -> Right, j -> Anterior, k -> Superior; canonical x runs to the left, y to posterior.
    "RAS": (
        (X, Y, Z),
        [(0.8, 0, 0), (0, 0.8, 0), (0, 0, 2.5)],
        (X - 1 - MARKER[2], Y - 1 - MARKER[1], MARKER[0]),
    ),
    # i -> Left, j -> Posterior, k -> Superior (DICOM-like).
    "LPS": (
        (X, Y, Z),
        [(-0.8, 0, 0), (0, -0.8, 0), (0, 0, 2.5)],
        (MARKER[2], MARKER[1], MARKER[0]),
    ),
    # Permuted and flipped: i -> Anterior, j -> Inferior, k -> Left.
    "AIL": (
        (Y, Z, X),
        [(0, 0.8, 0), (0, 0, -2.5), (-0.8, 0, 0)],
        (Y - 1 - MARKER[1], Z - 1 - MARKER[0], MARKER[2]),
    ),
    # Thin slices under coarser pixels: i -> Superior, j -> Right, k -> Posterior.
    "SRP-thin": (
        (Z, X, Y),
        [(0, 0, 0.6), (0.9, 0, 0), (0, -0.9, 0)],
        (MARKER[0], X - 1 - MARKER[2], MARKER[1]),
    ),
}


@pytest.mark.parametrize("case", sorted(ORIENTATION_CASES))
def test_nifti_orientations_land_the_marker_canonically(tmp_path, case):
    shape, columns, stored_index = ORIENTATION_CASES[case]
    stored = np.zeros(shape)
    stored[stored_index] = 1000.0
    affine = _save_nifti(tmp_path / "v.nii.gz", stored, columns)
    canonical = imaging.canonicalize(
        imaging.read_nifti(tmp_path / "v.nii.gz"), min_slices=4, min_in_plane=4
    )
    assert canonical.hu.shape == (Z, Y, X)
    assert np.unravel_index(np.argmax(canonical.hu), canonical.hu.shape) == MARKER
    # Same physical point through both affines.
    world = affine @ np.array([*stored_index, 1.0])
    np.testing.assert_allclose(canonical.affine @ np.array([*MARKER, 1.0]), world, atol=1e-4)
    # Canonical axes point Superior, Posterior, Left.
    directions = np.sign(np.round(canonical.affine[:3, :3], 6))
    np.testing.assert_array_equal(directions, [[0, 0, -1], [0, -1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    ("spacing", "axial"),
    [
        ((5.0, 0.8, 0.8), False),  # sagittal slices: thick along R-L
        ((0.8, 3.0, 0.8), False),  # coronal slices
        ((0.5, 0.8, 0.8), False),  # thin sagittal slices under coarser pixels (A-P, S-I at 0.8)
        ((0.8, 0.8, 0.8), True),  # isotropic: any plane is fine
    ],
)
def test_non_axial_acquisitions_are_rejected(spacing, axial):
    volume = imaging.Volume(np.zeros((8, 8, 8), np.float32), np.diag([*spacing, 1.0]), "v.nii")
    if axial:
        imaging.canonicalize(volume, min_slices=4, min_in_plane=4)
        return
    with pytest.raises(imaging.SkipVolume, match=r"not axial: v\.nii") as info:
        imaging.canonicalize(volume, min_slices=4, min_in_plane=4)
    assert info.value.reason == imaging.NOT_AXIAL


def test_degenerate_affine_is_rejected():
    volume = imaging.Volume(np.zeros((8, 8, 8), np.float32), np.diag([1.0, 0.0, 1.0, 1.0]), "v")
    with pytest.raises(imaging.SkipVolume) as info:
        imaging.canonicalize(volume, min_slices=4, min_in_plane=4)
    assert info.value.reason == imaging.BAD_AFFINE


@pytest.mark.parametrize("shape", [(70, 70, 10), (32, 70, 20)])  # RAS: 10 slices; 32 columns
def test_too_small_volumes_are_rejected(tmp_path, shape):
    _save_nifti(tmp_path / "s.nii.gz", np.zeros(shape), [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
    with pytest.raises(imaging.SkipVolume) as info:
        imaging.prepare_volume(imaging.read_nifti(tmp_path / "s.nii.gz"), min_in_plane=64)
    assert info.value.reason == imaging.TOO_SMALL


def test_unreadable_niftis_are_named_skips(tmp_path):
    _save_nifti(tmp_path / "ok.nii.gz", np.zeros((16, 16, 16)), np.eye(3))
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    for name in ("cut.nii.gz", "empty.nii.gz", "missing.nii.gz"):
        with pytest.raises(imaging.SkipVolume, match=re.escape(name)) as info:
            imaging.read_nifti(tmp_path / name)
        assert info.value.reason == imaging.UNREADABLE


def test_nan_voxels_are_rejected(tmp_path):
    stored = np.zeros((20, 70, 70))
    stored[3, 4, 5] = np.nan
    _save_nifti(tmp_path / "n.nii.gz", stored, [(0, 0, 1), (0, 1, 0), (1, 0, 0)])
    with pytest.raises(imaging.SkipVolume) as info:
        imaging.canonicalize(imaging.read_nifti(tmp_path / "n.nii.gz"))
    assert info.value.reason == imaging.NAN_VOXELS


def _write_ct_slice(path, pixels, position, orientation, slope, intercept):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.7, 0.8]
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    set_pixel_data(ds, pixels.astype(np.int16), "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    "orientation",
    [
        (1, 0, 0, 0, 1, 0),  # columns -> Left, rows -> Posterior: already canonical in-plane
        (1, 0, 0, 0, -1, 0),
    ],  # rows -> Anterior; slice normal points inferior
)
def test_dicom_series_sorted_by_position_with_per_slice_rescale(tmp_path, orientation):
    n, rows, cols = 5, 8, 9
    z_positions = 10.0 + 2.5 * np.arange(n)  # slice k has rank k from inferior to superior
    slopes = [1.0, 2.0, 1.0, 0.5, 2.0]
    stored = [np.full((rows, cols), 100 * (k + 1)) for k in range(n)]
    stored[3][1, 2] = 1500  # marker: 4th slice from the feet, stored row 1, column 2
    file_order = [3, 0, 4, 1, 2]  # file names do not follow anatomy
    for name, k in enumerate(file_order):
        _write_ct_slice(
            tmp_path / f"{name:03d}.dcm",
            stored[k],
            (-50.0, -60.0, z_positions[k]),
            orientation,
            slopes[k],
            -1024.0,
        )
    canonical = imaging.canonicalize(imaging.read_volume(tmp_path), min_slices=4, min_in_plane=4)
    assert canonical.hu.shape == (n, rows, cols)
    rows_posterior = orientation[4] > 0
    for k in range(n):  # canonical z is the rank from inferior to superior
        y = 1 if rows_posterior else rows - 2
        expected = np.full((rows, cols), 100.0 * (k + 1) * slopes[k] - 1024.0)
        if k == 3:
            expected[y, 2] = 1500 * slopes[k] - 1024.0
        np.testing.assert_array_equal(canonical.hu[k], expected)
    np.testing.assert_allclose(canonical.spacing, [2.5, 0.7, 0.8])


def test_dicom_series_with_duplicate_positions_is_inconsistent(tmp_path):
    for name in range(2):
        _write_ct_slice(
            tmp_path / f"{name}.dcm",
            np.zeros((4, 4)),
            (0.0, 0.0, 5.0),
            (1, 0, 0, 0, 1, 0),
            1.0,
            0.0,
        )
    with pytest.raises(imaging.SkipVolume) as info:
        imaging.read_dicom_series(tmp_path)
    assert info.value.reason == imaging.INCONSISTENT_SERIES


def test_dicom_series_with_a_non_dicom_file_is_unreadable(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(imaging.SkipVolume, match=r"notes\.txt") as info:
        imaging.read_dicom_series(tmp_path)
    assert info.value.reason == imaging.UNREADABLE


def test_area_resize_averages_blocks():
    volume = np.random.default_rng(6).normal(size=(4, 8, 6)).astype(np.float32)
    out = imaging.resize_volume(volume, (2, 4, 3))
    hand = volume.reshape(2, 2, 4, 2, 3, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(out, hand, rtol=1e-5, atol=1e-5)


def test_resize_weights_by_hand():
    x = np.array([10.0, 40.0, 70.0])
    # 3 -> 2 area: cells [0, 1.5] and [1.5, 3].
    area = imaging.resize_volume(x.reshape(3, 1, 1), (2, 1, 1))[:, 0, 0]
    np.testing.assert_allclose(area, [(10 + 20) / 1.5, (20 + 70) / 1.5], rtol=1e-6)
    # 2 -> 4 linear at voxel centres -0.25, 0.25, 0.75, 1.25 (edges clamped).
    up = imaging.resize_volume(np.array([0.0, 8.0]).reshape(1, 2, 1), (1, 4, 1))[0, :, 0]
    np.testing.assert_allclose(up, [0.0, 2.0, 6.0, 8.0])
    # 6 -> 2 without antialiasing samples the centres 1.0 and 4.0.
    six = np.arange(6.0).reshape(1, 1, 6)
    np.testing.assert_allclose(imaging.resize_volume(six, (1, 1, 2), antialias=False), [[[1, 4]]])


def test_prepare_volume_stores_int16_at_target_shape():
    hu = np.full((20, 70, 66), -500.0, np.float32)
    hu[10:] = 300.0  # superior half
    affine = np.diag([1.0, -0.7, -0.7, 1.0])[[2, 1, 0, 3]]  # axis0 -> S, 1 -> P, 2 -> L
    stored = imaging.prepare_volume(imaging.Volume(hu, affine, "v"))
    assert stored.dtype == np.int16 and stored.shape == (32, 128, 128)
    assert (stored[:15] == -500).all() and (stored[17:] == 300).all()


def test_hu_window_by_hand():
    hu = np.array([-2000, -1000, 0, 500, 1000, 3000], np.int16)
    np.testing.assert_allclose(imaging.window_hu(hu), [0, 0, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(imaging.window_hu(hu, (-160, 240)), [0, 0, 0.4, 1, 1, 1])
    assert imaging.window_hu(hu).dtype == np.float32
