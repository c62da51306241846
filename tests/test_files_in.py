"""Files in: X-ray and CT files on disk -> a run's inputs and embeddings,
with the preprocessing the run recorded in its config.json; the embed command."""

import copy
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import set_pixel_data
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from configs.pretrain import get_config
from data_pipelines import imaging
from tests.test_imaging import _testdata, _write_ct_slice, _write_xray
from tests.tiny_runs import subprocess_env, tiny_run_config
from unimedi_jax import inference
from unimedi_jax.config.upgrade import read_run_config
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.trainers.pretraining import train

ROOT = Path(__file__).resolve().parents[1]
ORIENTATION = (1, 0, 0, 0, 1, 0)  # rows -> Left, columns -> Posterior (LPS)
PIXEL_SPACING = (0.7, 0.8)  # between rows, between columns (_write_ct_slice's)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A folder holding ``runs/demo``, a two-step tiny run (X-rays stored at 32, crop 32,
    volumes 8 x 32 x 32), as the line of docs/outputs.md expects."""
    root = tmp_path_factory.mktemp("files_in")
    train(tiny_run_config(root / "data", total_steps=2), root / "runs" / "demo")
    return root


@pytest.fixture(scope="module")
def model(demo):
    return inference.load(demo / "runs" / "demo")


def _ct(seed: int = 3, depth: int = 16) -> np.ndarray:
    """Stored int16 values [slice from the feet up, row, column] of a 16 x 64 x 64 CT."""
    return np.random.default_rng(seed).integers(0, 2400, (depth, 64, 64))


def _write_series(folder: Path, stored: np.ndarray, series_uid: str, prefix: str = "") -> None:
    """One file a slice, file names in a shuffled order, slice k at z = 10 + 2.5 k."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stored))
    for name, k in enumerate(rng.permutation(len(stored))):
        path = folder / f"{prefix}{name:03d}.dcm"
        _write_ct_slice(path, stored[k], (-50.0, -60.0, 10.0 + 2.5 * k), ORIENTATION, 1.0, -1024)
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.save_as(path)


def _write_nifti(path: Path, stored: np.ndarray) -> None:
    """The same CT as `_write_series` writes, as NIfTI by hand: array axes (column, row, slice),
    RAS+ affine (LPS x, y negated), HU."""
    affine = np.diag([-PIXEL_SPACING[1], -PIXEL_SPACING[0], 2.5, 1.0])
    affine[:3, 3] = (50.0, 60.0, 10.0)
    hu = (stored.astype(np.float32) - 1024.0).transpose(2, 1, 0)
    nib.save(nib.Nifti1Image(hu, affine), path)


def _write_enhanced_ct(path: Path, stored: np.ndarray, order: np.ndarray) -> None:
    """All slices in one multi-frame file, frames in `order`, each placed by its functional
    groups; slope 2 and intercept -1024 in the shared group."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(ORIENTATION)
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = list(PIXEL_SPACING)
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1024
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [-50.0, -60.0, 10.0 + 2.5 * k]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    set_pixel_data(ds, stored[order].astype(np.int16), "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)


def _volume_by_hand(hu: np.ndarray) -> np.ndarray:
    """A 16 x 64 x 64 canonical HU volume -> the tiny run's input: 2 x 2 x 2 block means (the
    area resize to 8 x 32 x 32), rounded to stored int16, windowed -1000..200 (the demo's lung
    window, which tiny keeps)."""
    blocks = hu.astype(np.float64).reshape(8, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    return np.clip((np.rint(blocks) + 1000.0) / 1200.0, 0.0, 1.0)


# ----------------------------------------------------------------------------- the record


def test_training_records_the_preprocessing_of_its_data(demo):
    saved = json.loads((demo / "runs" / "demo" / "config.json").read_text())
    assert saved["preprocessing"] == {
        "image_stored_size": 32,  # the phantoms' stored X-rays (prepared at the crop size)
        "image_crop": 32,
        "volume_shape": [8, 32, 32],
        "hu_window": [-1000.0, 200.0],  # the demo's lung window, which tiny keeps
        "image_resize": "letterbox",
        "volume_orientation": "SPL",
        "volume_resize": "area",
    }


def test_a_run_saved_before_the_record_gets_the_defaults_it_trained_with(tmp_path):
    older = get_config("tiny").to_dict()  # as saved, without `preprocessing`
    older["model"]["image_size"] = (64, 64)
    (tmp_path / "config.json").write_text(json.dumps(older))
    assert read_run_config(tmp_path).preprocessing.image_stored_size == 64  # the demo's phantoms
    older["data"]["sources_2d"] = "mimic_cxr_jpg"
    (tmp_path / "config.json").write_text(json.dumps(older))
    upgraded = read_run_config(tmp_path).preprocessing
    assert upgraded.image_stored_size == 256  # data_pipelines.prepare's default --image_size
    assert (upgraded.image_crop, list(upgraded.volume_shape)) == (64, [8, 32, 32])
    assert list(upgraded.hu_window) == list(older["data"]["hu_window"])


def test_the_recorded_stored_size_is_what_files_are_letterboxed_to(model, tmp_path):
    """A 16 x 32 PNG: letterboxed to the recorded stored size, then centre-cropped to 32."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 32)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    hand = np.zeros((32, 32))
    hand[8:24] = pixels  # stored at 32: the longer side fits, rows padded 8 and 8
    np.testing.assert_allclose(model.read_image(tmp_path / "x.png")[0], hand / 255, rtol=1e-6)
    # A run whose data were stored at 64 (crop 32): x2 bilinear, then rows 16..48, cols 16..48.
    other = copy.copy(model)
    other.config = ml_collections.ConfigDict(model.config.to_dict())
    other.config.preprocessing.image_stored_size = 64
    enlarged = np.asarray(Image.fromarray(pixels).resize((64, 32), Image.Resampling.BILINEAR))
    padded = np.zeros((64, 64))
    padded[16:48] = enlarged
    got = other.read_image(tmp_path / "x.png")[0]
    np.testing.assert_allclose(got, padded[16:48, 16:48] / 255, rtol=1e-6)


# ----------------------------------------------------------------------------- X-rays


def test_png_jpeg_and_dicom_xrays_embed(model, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    Image.fromarray(pixels).save(tmp_path / "x.jpg", quality=95)
    with Image.open(io.BytesIO((tmp_path / "x.jpg").read_bytes())) as decoded:
        jpeg = np.asarray(decoded.convert("L"), np.float64)
    np.testing.assert_allclose(model.read_image(tmp_path / "x.jpg")[0], jpeg / 255, rtol=1e-6)
    png = model.read_image(tmp_path / "x.png")
    np.testing.assert_allclose(png[0], pixels / 255.0, rtol=1e-6)
    embeddings = model.embed_images(png)
    np.testing.assert_allclose(embeddings, model.embed_images(pixels[None] / 255.0), atol=1e-6)
    assert embeddings.shape[0] == 1 and np.isclose(np.linalg.norm(embeddings), 1.0, atol=1e-5)


def test_monochrome1_dicom_is_windowed_inverted_and_letterboxed(model):
    """pydicom-data's chest X-ray: the DICOM LINEAR window written out by hand, inverted, then
    shrunk to the stored 32 (area means: the letterbox's documented resize) and cropped."""
    path = _testdata("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64)
    center, width = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1.0
    hand = np.rint((1.0 - np.clip((raw - center) / width + 0.5, 0.0, 1.0)) * 255.0)
    stored = imaging.letterbox(hand.astype(np.uint8), 32)
    got = model.read_image(path)
    assert got.shape == (1, 32, 32)
    np.testing.assert_allclose(got[0], stored / 255.0, atol=1.01 / 255)
    assert np.isfinite(model.embed_images(got)).all()


def test_voi_lut_dicom_maps_through_its_lut(model, tmp_path):
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4, 100, 12])  # 4 entries from stored 100, 12 bits
    item.add_new("LUTData", "US", [400, 800, 1600, 2000])
    values = np.array([0, 100, 101, 102, 103, 4000])
    index = np.random.default_rng(2).integers(0, 6, (32, 32))
    _write_xray(tmp_path / "lut.dcm", values[index], VOILUTSequence=[item])
    lut = np.array([400, 400, 800, 1600, 2000, 2000])[index]  # below/above: first/last entry
    hand = np.rint((lut - 400) / 1600 * 255) / 255
    np.testing.assert_allclose(model.read_image(tmp_path / "lut.dcm")[0], hand, rtol=1e-6)


# ----------------------------------------------------------------------------- CT


def test_dicom_series_two_series_largest_taken_other_named(tmp_path):
    stored, small = _ct(), _ct(seed=4, depth=3)
    _write_series(tmp_path / "study", stored, "1.2.3.1", prefix="a")
    _write_series(tmp_path / "study", small, "1.2.3.2", prefix="b")
    with pytest.warns(imaging.OtherSeriesWarning, match=r"1\.2\.3\.2 \(3 frames\)") as caught:
        volume = imaging.read_volume(tmp_path / "study")
    assert "read the largest, 1.2.3.1 (16 frames)" in str(caught[0].message)
    np.testing.assert_array_equal(volume.hu, stored - 1024.0)  # slices by position: feet first


def test_multiframe_dicom_reads_as_its_single_frame_series(tmp_path):
    stored = _ct()
    _write_enhanced_ct(tmp_path / "ct.dcm", stored, np.random.default_rng(5).permutation(16))
    assert imaging.input_kind(tmp_path / "ct.dcm") == imaging.VOLUME
    volume = imaging.canonicalize(imaging.read_volume(tmp_path / "ct.dcm"))
    # Canonical S-P-L: slices feet first; rows (posterior) and columns (left) as stored.
    np.testing.assert_array_equal(volume.hu, stored * 2.0 - 1024.0)
    np.testing.assert_allclose(volume.spacing, [2.5, *PIXEL_SPACING])


def test_dicom_series_in_shuffled_order_and_its_nifti_embed_alike(model, tmp_path):
    stored = _ct()
    _write_series(tmp_path / "series", stored, "1.2.3.1")
    _write_nifti(tmp_path / "ct.nii.gz", stored)
    from_dicom = model.read_volume(tmp_path / "series")
    from_nifti = model.read_volume(tmp_path / "ct.nii.gz")
    assert from_dicom.shape == (1, 8, 32, 32)
    np.testing.assert_allclose(from_dicom[0], _volume_by_hand(stored - 1024.0), atol=1e-6)
    np.testing.assert_array_equal(from_dicom, from_nifti)
    np.testing.assert_allclose(
        model.embed_volumes(from_dicom), model.embed_volumes(from_nifti), atol=1e-6
    )


def test_unreadable_files_are_named_user_errors(model, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(inference.InputFileError, match=r"broken\.jpg"):
        model.read_image(tmp_path / "broken.jpg")
    with pytest.raises(inference.InputFileError, match=r"unreadable file: .*missing\.nii\.gz"):
        model.read_volume(tmp_path / "missing.nii.gz")
    _write_series(tmp_path / "short", _ct(depth=4), "1.2.3.1")  # 4 slices: the builders skip it
    with pytest.raises(inference.InputFileError, match=r"too small: .*short"):
        model.read_volume(tmp_path / "short")


# ----------------------------------------------------------------------------- the command


def _readme_line() -> str:
    page = (ROOT / "docs" / "outputs.md").read_text()
    (line,) = re.findall(r"^python -m unimedi_jax\.embed .*$", page, re.M)
    return line


def test_embed_readme_line(demo, model, tmp_path_factory):
    scans = demo / "scans"
    pixels = np.random.default_rng(7).integers(0, 256, (40, 30)).astype(np.uint8)
    (scans / "xrays").mkdir(parents=True)
    Image.fromarray(pixels).save(scans / "xrays" / "a.png")
    _write_xray(scans / "xrays" / "b.dcm", pixels.astype(np.uint16) * 16)
    (scans / "xrays" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (scans / "xrays" / "labels.csv").write_text("path,finding\na.png,normal\n")
    _write_series(scans / "study", _ct(), "1.2.3.1")
    (scans / "study" / "README").write_text("exported by a viewer")
    _write_series(scans / "study", _ct(seed=4, depth=3), "1.2.3.2", prefix="b")
    _write_nifti(scans / "ct.nii.gz", _ct(seed=8))
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, *shlex.split(_readme_line())[1:]],
        cwd=demo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^failed scans/xrays/broken\.jpg: unreadable file", out, re.M), out
    assert re.search(r"^warning scans/study: .*left out 1\.2\.3\.2 \(3 frames\)", out, re.M)
    assert "wrote embeddings.npz: 4 embeddings (2 images, 2 volumes), 1 failed" in out
    assert "skipped 1 files that are neither images nor volumes by name and content (1 .csv)" in out
    assert re.search(r"^warning scans/study: .*set aside 1 files .*not DICOM: README", out, re.M)
    assert re.search(r"read and embedded 5/5 inputs, [\d.]+ files/s, ETA 0 s$", proc.stderr, re.M)
    saved = np.load(demo / "embeddings.npz", allow_pickle=False)
    expected = ["scans/ct.nii.gz", "scans/study", "scans/xrays/a.png", "scans/xrays/b.dcm"]
    assert list(saved["paths"]) == expected
    assert list(saved["kinds"]) == ["volume", "volume", "image", "image"]
    assert list(saved["failed_paths"]) == ["scans/xrays/broken.jpg"]
    # Independent of the command: the API on the same files, and the similarity by hand.
    images = np.concatenate([model.read_image(demo / p) for p in expected[2:]])
    volumes = np.concatenate([model.read_volume(demo / p) for p in expected[:2]])
    want = np.concatenate([model.embed_volumes(volumes), model.embed_images(images)])
    np.testing.assert_allclose(saved["embeddings"], want, atol=1e-5)
    texts = list(saved["texts"])
    assert texts == ["No pleural effusion.", "Large pleural effusion."]
    similarity = want @ model.embed_texts(texts).T
    np.testing.assert_allclose(saved["similarity"], similarity, atol=1e-5)
    assert "cosine similarity" in out
    for path, row in zip(expected, similarity, strict=True):
        (line,) = [line for line in out.splitlines() if line.startswith(f"{path} ")]
        shown = [float(v) for v in re.findall(r"[+-]\d\.\d{4}", line)]
        np.testing.assert_allclose(shown, row, atol=1e-4)
        assert line.count("*") == 1 and f"{row.max():+.4f}*" in line


def test_embed_exits_2_when_nothing_reads(demo, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    bad = [str(tmp_path / "bad.png"), str(tmp_path / "nowhere")]
    proc = subprocess.run(
        [sys.executable, "-m", "unimedi_jax.embed", "--workdir=runs/demo", "--out=x.npz", *bad],
        cwd=demo,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "failed" in proc.stdout and "nowhere: no such file or folder" in proc.stdout
    assert "NothingEmbeddedError: none of the 2 inputs" in proc.stderr
    assert not (demo / "x.npz").exists()


def test_volumes_embed_with_the_slices_given(model):
    """Eq. 2's own slices give embed_volumes' embeddings; zero slices the volume alone; other
    slices the joint pass on them, as a direct call of the model computes it."""
    volumes = np.random.default_rng(5).random((3, 8, 32, 32)).astype(np.float32)
    chosen, _ = model.select_slices(volumes)
    np.testing.assert_allclose(
        model.embed_volumes(volumes, slice_indices=chosen), model.embed_volumes(volumes), atol=1e-6
    )
    params = model.params

    def direct(slices):
        out = model.model.apply({"params": params}, volumes, slices, method=UniMedI.encode_vision)
        emb = model.model.apply({"params": params}, out.tokens[:, 0], method=UniMedI.project_vision)
        return np.asarray(emb)

    alone = model.embed_volumes(volumes, slice_indices=np.zeros((3, 0), np.int32))
    np.testing.assert_allclose(alone, direct(None), atol=1e-6)
    other = np.array([[0, 7], [1, 2], [5, 6]])
    np.testing.assert_allclose(
        model.embed_volumes(volumes, slice_indices=other),
        direct(volumes[np.arange(3)[:, None], other]),
        atol=1e-6,
    )
