"""data_pipelines.transforms: crops, HU window, flips and the file preprocessing of inference,
each against a reference computed by hand."""

import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import imaging, transforms
from tests.test_imaging import _testdata, _write_ct_slice


def test_eval_crop_is_the_centre():
    image = np.random.default_rng(2).integers(0, 256, (256, 256), dtype=np.uint8)
    out = transforms.eval_transform_2d(image, crop_size=224)
    assert out.dtype == np.float32 and out.shape == (224, 224)
    np.testing.assert_allclose(out, image[16:240, 16:240] / 255.0, rtol=1e-6)


def test_train_crop_is_in_bounds_and_seeded():
    image = np.random.default_rng(4).integers(0, 256, (256, 256), dtype=np.uint8)
    a = transforms.train_transform_2d(image, np.random.default_rng(5))
    assert a.dtype == np.float32 and a.shape == (224, 224)
    assert a.min() >= 0.0 and a.max() <= 1.0
    offsets = [
        (top, left)
        for top in range(33)
        for left in range(33)
        if np.array_equal(np.rint(a * 255.0), image[top : top + 224, left : left + 224])
    ]
    assert len(offsets) == 1  # one in-bounds window of the image
    np.testing.assert_array_equal(a, transforms.train_transform_2d(image, np.random.default_rng(5)))
    crops = {
        transforms.train_transform_2d(image, np.random.default_rng(s)).tobytes() for s in range(8)
    }
    assert len(crops) > 1


def test_crop_larger_than_image_is_an_error():
    with pytest.raises(ValueError, match="crop size"):
        transforms.train_transform_2d(np.zeros((100, 300), np.uint8), np.random.default_rng(0))


def test_transform_3d_is_the_hu_window():
    stored = np.array([-2000, -1000, 0, 500, 1000, 3000], np.int16).reshape(1, 2, 3)
    out = transforms.transform_3d(stored)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0, 0, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(
        transforms.transform_3d(stored, (-160.0, 240.0)).ravel(), [0, 0, 0.4, 1, 1, 1]
    )


def test_random_flips_mirror_whole_volumes_along_each_axis_about_half_the_time():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    counts = {0: 0, 2: 0}
    for seed in range(200):
        out = transforms.random_flips(volume, np.random.default_rng(seed), (0, 2))
        (axes,) = [a for a in [(), (0,), (2,), (0, 2)] if np.array_equal(out, np.flip(volume, a))]
        for axis in axes:
            counts[axis] += 1
        again = transforms.random_flips(volume, np.random.default_rng(seed), (0, 2))
        np.testing.assert_array_equal(out, again)
    assert all(60 <= n <= 140 for n in counts.values()), counts
    np.testing.assert_array_equal(
        transforms.random_flips(volume, np.random.default_rng(0), ()), volume
    )


def test_real_chest_xray_file_is_letterboxed_then_centre_cropped():
    """pydicom-data's MONOCHROME1 chest X-ray: the builders' letterbox, then the eval crop."""
    path = _testdata("RG1_UNCR.dcm")
    out = transforms.xray_from_file(path, crop_size=48, stored_size=64)
    assert out.dtype == np.float32 and out.shape == (48, 48)
    stored = imaging.letterbox(imaging.read_image_2d(path), 64)
    np.testing.assert_allclose(out, stored[8:56, 8:56] / 255.0, rtol=1e-6)
    with pytest.raises(imaging.SkipImage, match=r"missing\.png"):
        transforms.xray_from_file("missing.png")


def test_dicom_series_file_is_canonical_resized_stored_and_windowed(tmp_path):
    """A 16 x 64 x 64 axial series halved along each axis: 2x2x2 block means (the area resize),
    rounded to stored int16 HU, then windowed."""
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 2400, (16, 64, 64))
    for k in rng.permutation(16):  # file names in no anatomical order
        position = (-50.0, -60.0, 10.0 + 2.5 * k)
        _write_ct_slice(
            tmp_path / f"{k:03d}.dcm", stored[k], position, (1, 0, 0, 0, 1, 0), 1.0, -1024.0
        )
    out = transforms.volume_from_file(tmp_path, shape=(8, 32, 32), window=(-1000.0, 1000.0))
    hu = stored.astype(np.float64) - 1024.0
    blocks = hu.reshape(8, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    want = np.clip((np.rint(blocks) + 1000.0) / 2000.0, 0.0, 1.0)
    assert out.dtype == np.float32 and out.shape == (8, 32, 32)
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_transforms_import_no_jax():
    """The transform layer is numpy: a reader without jax (a data worker, a PyTorch-only
    consumer) can preprocess files and records alike."""
    code = "import sys, data_pipelines.transforms; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
