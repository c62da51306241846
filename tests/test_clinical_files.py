"""Files as a hospital exports them: every DICOM transfer syntax, decoded by the base install.

Each syntax is checked on real encoded data: pydicom-data's files (compared with their
uncompressed twin, or with sums and rows that libjpeg and CharLS, other decoders than the base
install's GDCM, give), and a real CT slice encoded here by GDCM (JPEG Lossless, JPEG-LS).
"""

import functools
import io
import re
import shutil
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import gdcm
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import DigitalXRayImageStorageForPresentation, JPEGBaseline8Bit, generate_uid

from data_pipelines import imaging, transforms
from tests.test_imaging import _testdata, _write_ct_slice
from unimedi_jax import inference, torch_model
from unimedi_jax.evaluation import embed_files

TWINS = {  # compressed (or differently encoded) file -> its uncompressed twin, its syntax
    "MR_small_implicit.dcm": ("MR_small.dcm", "1.2.840.10008.1.2"),
    "MR_small_bigendian.dcm": ("MR_small.dcm", "1.2.840.10008.1.2.2"),
    "MR_small_RLE.dcm": ("MR_small.dcm", "1.2.840.10008.1.2.5"),
    "MR_small_jpeg_ls_lossless.dcm": ("MR_small.dcm", "1.2.840.10008.1.2.4.80"),
    "MR_small_jp2klossless.dcm": ("MR_small.dcm", "1.2.840.10008.1.2.4.90"),
    "RG1_J2KR.dcm": ("RG1_UNCR.dcm", "1.2.840.10008.1.2.4.90"),
    "RG1_J2KI.dcm": ("RG1_UNCI.dcm", "1.2.840.10008.1.2.4.91"),
    "693_J2KR.dcm": ("693_UNCR.dcm", "1.2.840.10008.1.2.4.90"),
}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_encoded_files_read_as_their_uncompressed_twin(name):
    twin, syntax = TWINS[name]
    path = _testdata(name)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(
        imaging.read_image_2d(path), imaging.read_image_2d(_testdata(twin))
    )


# File -> (syntax, pixel sum, the middle row every eighth column), as libjpeg (pylibjpeg) and,
# for JPEG-LS, CharLS (pyjpegls) decode them. 12-bit JPEG Extended is lossy: GDCM's inverse DCT
# rounds within one grey level of libjpeg's.
DECODED = {
    "JPEG-LL.dcm": ("1.2.840.10008.1.2.4.70", 3596452, [0, 0, 15, 16, 13, 15, 27, 0]),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": (
        "1.2.840.10008.1.2.4.70",
        13572107,
        [0, 0, 83, 55, 15, 64, 79, 0],
    ),
    "bad_sequence.dcm": (
        "1.2.840.10008.1.2.4.70",
        248348502,
        [1100, 1091, 150, 1275, 1226, 932, 1073, 1100],
    ),
    "JPGExtended.dcm": ("1.2.840.10008.1.2.4.51", 3770427, [1, 1, 14, 20, 14, 19, 23, 1]),
    "JPEGLSNearLossless_16.dcm": ("1.2.840.10008.1.2.4.81", 6007250, [255] * 10),
}


@pytest.mark.parametrize("name", sorted(DECODED))
def test_jpeg_files_decode_as_other_decoders_do(name):
    syntax, total, row = DECODED[name]
    path = _testdata(name)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    pixels = pixel_array(path).astype(np.int64)
    middle = pixels[len(pixels) // 2, :: max(1, pixels.shape[1] // 8)]
    lossy = syntax == "1.2.840.10008.1.2.4.51"
    np.testing.assert_allclose(middle, row, atol=1 if lossy else 0)
    assert abs(pixels.sum() - total) <= (pixels.size // 20 if lossy else 0)
    assert imaging.read_image_2d(path).shape == pixels.shape  # and the X-ray reader takes it


def test_deflated_file_reads_as_its_inflated_bytes():
    path = _testdata("image_dfl.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    raw = Path(path).read_bytes()
    body = raw[132 + 12 + ds.file_meta.FileMetaInformationGroupLength :]  # after the meta group
    pixels = np.frombuffer(zlib.decompress(body, -15)[-512 * 512 :], np.uint8).reshape(512, 512)
    hand = np.rint((pixels - float(pixels.min())) / float(np.ptp(pixels)) * 255)
    np.testing.assert_array_equal(imaging.read_image_2d(path), hand)


def test_a_grey_jpeg_baseline_xray_reads_as_pillow_decodes_it(tmp_path):
    """A real chest X-ray (RG1_UNCR.dcm, windowed to 8 bits) encoded by Pillow's libjpeg."""
    pixels = imaging.read_image_2d(_testdata("RG1_UNCR.dcm"))[::4, ::4]
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    decoded = np.asarray(Image.open(jpeg), np.float64)
    hand = np.rint((decoded - decoded.min()) / np.ptp(decoded) * 255)
    np.testing.assert_array_equal(imaging.read_image_2d(tmp_path / "x.dcm"), hand)


def _gdcm_encode(src: Path, dst: Path, syntax: str, lossy_error: int = 0) -> None:
    """Write `src` as `dst` in one of GDCM's JPEG or JPEG-LS syntaxes (its own encoder)."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    if lossy_error:
        codec = gdcm.JPEGLSCodec()
        codec.SetLossless(False)
        codec.SetLossyError(lossy_error)
        change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


@pytest.mark.parametrize(
    ("syntax", "uid", "error"),
    [
        ("JPEGLosslessProcess14", "1.2.840.10008.1.2.4.57", 0),
        ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70", 0),
        ("JPEGLSLossless", "1.2.840.10008.1.2.4.80", 0),
        ("JPEGLSNearLossless", "1.2.840.10008.1.2.4.81", 2),
    ],
)
def test_a_real_ct_slice_encoded_by_gdcm_reads_back(tmp_path, syntax, uid, error):
    original = Path(_testdata("693_UNCR.dcm"))
    _gdcm_encode(original, tmp_path / "ct.dcm", syntax, error)
    assert pydicom.dcmread(tmp_path / "ct.dcm").file_meta.TransferSyntaxUID == uid
    got = imaging.read_dicom_series([tmp_path / "ct.dcm"]).hu
    want = imaging.read_dicom_series([original]).hu
    assert np.abs(got - want).max() == error  # GDCM's near-lossless bound is reached, not passed


def _jpeg_lossless_series(folder: Path, depth: int = 16) -> np.ndarray:
    """A CT series of `depth` slices in JPEG Lossless (.70), file names against anatomy: the
    real slice 693_UNCR.dcm shifted by k rows at z = k * 1.25 mm. Returns the HU by hand."""
    ds = pydicom.dcmread(_testdata("693_UNCR.dcm"))
    folder.mkdir()
    stored = ds.pixel_array
    hu = []
    series = generate_uid()
    for k in range(depth):
        plane = np.roll(stored, 3 * k, axis=0)
        ds.PixelData = plane.tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series
        ds.ImagePositionPatient = [-160.0, -160.0, 1.25 * k]
        plain = folder / f"plain{k}.dcm"
        ds.save_as(plain)
        _gdcm_encode(plain, folder / f"{depth - k:03d}.dcm", "JPEGLosslessProcess14_1")
        plain.unlink()
        hu.append(plane * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(hu)


def test_a_ct_series_in_jpeg_lossless_reads_slice_by_slice(tmp_path):
    hu = _jpeg_lossless_series(tmp_path / "series")
    volume = imaging.read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.spacing[0], 1.25)


def test_a_scanners_jpeg_lossless_ct_reads_as_a_series(tmp_path):
    """bad_sequence.dcm, a CT slice a Siemens scanner encoded, copied to three positions."""
    source = Path(_testdata("bad_sequence.dcm"))
    for k in range(3):
        shutil.copy(source, tmp_path / f"{k}.dcm")
        ds = pydicom.dcmread(tmp_path / f"{k}.dcm")
        ds.ImagePositionPatient = [-65.36, -154.36, 1687.5 + k]
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(tmp_path / f"{k}.dcm")
    volume = imaging.read_volume(tmp_path)
    _, total, row = DECODED["bad_sequence.dcm"]
    assert volume.hu.shape == (3, 512, 512)
    assert volume.hu.astype(np.int64).sum() == 3 * (total - 1024 * 512 * 512)
    np.testing.assert_array_equal(volume.hu[1, 256, ::64], np.array(row) - 1024)


# ------------------------------------------------------------------ folders as exported


def _write_slices(folder: Path, depth: int, series: str, orientation=(1, 0, 0, 0, 1, 0)) -> None:
    """`depth` slices of one series, 2.5 mm apart along the slice normal, HU -1024..1375."""
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(orientation[:3], orientation[3:])
    rng = np.random.default_rng(depth)
    for k in range(depth):
        path = folder / f"{series}-{k:03d}.dcm"
        position = tuple(-50.0 + 2.5 * k * normal)
        pixels = rng.integers(0, 2400, (64, 64))
        _write_ct_slice(path, pixels, position, orientation, 1.0, -1024)
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.save_as(path)


def _clutter(folder: Path) -> None:
    """What an export puts beside a series: a README, a JPEG thumbnail, its DICOMDIR index
    and a structured report (pydicom-data's)."""
    (folder / "README").write_text("Exported by a PACS viewer.\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "thumb.jpg")
    shutil.copy(_testdata("DICOMDIR"), folder / "DICOMDIR")
    shutil.copy(_testdata("reportsi.dcm"), folder / "report.dcm")


def test_a_series_folder_sets_aside_what_is_no_image_with_one_line(tmp_path):
    _write_slices(tmp_path / "ct", 4, "1.2.3.4")
    clean = imaging.read_volume(tmp_path / "ct")
    _clutter(tmp_path / "ct")
    with pytest.warns(imaging.SetAsideWarning) as caught:
        volume = imaging.read_volume(tmp_path / "ct")
    np.testing.assert_array_equal(volume.hu, clean.hu)
    (line,) = [str(w.message) for w in caught]
    assert line == (
        f"{tmp_path / 'ct'}: set aside 4 files that are no image of a series (1 DICOMDIR index: "
        "DICOMDIR; 2 not DICOM: README, thumb.jpg; 1 without pixel data (Basic Text SR "
        "Storage): report.dcm); read its 4 DICOM images"
    )


def test_a_folder_with_no_dicom_image_says_what_it_held(tmp_path):
    _clutter(tmp_path)
    with pytest.raises(imaging.SkipVolume, match="no DICOM image: 1 DICOMDIR index") as info:
        imaging.read_volume(tmp_path)
    assert info.value.reason == imaging.NO_PIXEL_DATA
    assert "Basic Text SR Storage" in str(info.value)


def test_a_damaged_dicom_file_in_a_series_is_still_an_error(tmp_path):
    _write_slices(tmp_path, 4, "1.2.3.4")
    data = (tmp_path / "1.2.3.4-001.dcm").read_bytes()
    (tmp_path / "1.2.3.4-001.dcm").write_bytes(data[:200])  # the magic, then cut
    with pytest.raises(imaging.SkipVolume, match=r"1\.2\.3\.4-001\.dcm") as info:
        imaging.read_volume(tmp_path)
    assert info.value.reason == imaging.NO_PIXEL_DATA  # pydicom reads what is left: no pixels


def test_a_folder_of_reformats_names_each_series_and_the_minimum(tmp_path):
    """Single slices of three series (axial, coronal, sagittal) and a README: none is a CT."""
    _write_slices(tmp_path, 1, "1.2.3.1")
    _write_slices(tmp_path, 1, "1.2.3.2", orientation=(1, 0, 0, 0, 0, -1))
    _write_slices(tmp_path, 2, "1.2.3.3", orientation=(0, 1, 0, 0, 0, -1))
    (tmp_path / "README").write_text("reformats")
    with pytest.raises(imaging.SkipVolume) as info, pytest.warns(imaging.ReadWarning):
        transforms.volume_from_file(tmp_path)
    assert info.value.reason == imaging.TOO_SMALL
    assert (
        "at least 16 slices of 64 x 64 needed; the folder holds 1.2.3.1: axial, 1 slices; "
        "1.2.3.2: coronal, 1 slices; 1.2.3.3: sagittal, 2 slices"
    ) in str(info.value)


def test_a_walk_skips_what_is_neither_image_nor_volume_and_counts_it(tmp_path):
    _write_slices(tmp_path / "ct", 2, "1.2.3.4")
    _clutter(tmp_path)
    for name in ("labels.csv", "notes.txt", "meta.json", "study.md"):
        (tmp_path / name).write_text("PatientID,Finding\n")
    shutil.copy(tmp_path / "thumb.jpg", tmp_path / "no_suffix")  # a JPEG by its content
    found, failed, skipped = embed_files.collect_inputs([tmp_path, tmp_path / "labels.csv"])
    assert found == [
        (str(tmp_path / "ct"), imaging.VOLUME),
        (str(tmp_path / "no_suffix"), imaging.IMAGE),
        (str(tmp_path / "thumb.jpg"), imaging.IMAGE),
    ]
    assert failed == [(str(tmp_path / "labels.csv"), embed_files.NOT_AN_INPUT)]  # named: fails
    assert sorted(Path(p).name for p in skipped) == [
        "DICOMDIR", "README", "labels.csv", "meta.json", "notes.txt", "report.dcm", "study.md"
    ]  # fmt: skip
    assert embed_files.skipped_line(skipped) == (
        "skipped 7 files that are neither images nor volumes by name and content (1 DICOMDIR, "
        "1 README, 1 .csv, 1 .json, 1 .txt, 1 .dcm, 1 .md)"
    )


# ------------------------------------------------------------------ intensities and extents

PREPROCESSING = transforms.FilePreprocessing(
    image_stored_size=64, image_crop=64, volume_shape=(8, 32, 32), hu_window=(-1000.0, 1000.0)
)


def _write_real_nifti(path: Path, hu: np.ndarray, spacing=(0.7, 0.7, 2.5)) -> None:
    """`hu` [slice, row, column] as a NIfTI (axes column, row, slice; LPS x, y negated)."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), path)


def _real_ct(depth: int = 16) -> np.ndarray:
    """HU [depth, 128, 128] from a real CT slice (693_UNCR.dcm, every fourth pixel), shifted
    by 3 rows a slice."""
    ds = pydicom.dcmread(_testdata("693_UNCR.dcm"))
    hu = ds.pixel_array[::4, ::4] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.stack([np.roll(hu, 3 * k, axis=0) for k in range(depth)]).astype(np.float32)


def test_an_8bit_windowed_ct_is_refused_with_what_to_pass_then_read_as_stated(tmp_path):
    hu = np.clip(_real_ct(), -1000, 1000)  # within the window: its resize is the same
    windowed = np.rint((hu + 1000) / 2000 * 255).astype(np.uint8)
    _write_real_nifti(tmp_path / "hu.nii.gz", hu)
    _write_real_nifti(tmp_path / "windowed.nii.gz", windowed)
    with pytest.raises(transforms.InputFileError) as info:
        PREPROCESSING.volume(tmp_path / "windowed.nii.gz")
    message = str(info.value)
    assert message.startswith(f"not Hounsfield units: {tmp_path / 'windowed.nii.gz'} (values 0")
    assert "none negative, and no rescale to Hounsfield units" in message
    assert "--ct_intensity=windowed:255" in message and "intensity='windowed:255'" in message
    with pytest.warns(imaging.ExtentWarning):
        stated = PREPROCESSING.volume(tmp_path / "windowed.nii.gz", "windowed:255")
        original = PREPROCESSING.volume(tmp_path / "hu.nii.gz")
    # The window of the stated values is training's window of the HU they were made from.
    np.testing.assert_allclose(stated, original, atol=0.6 / 255)
    assert np.ptp(stated) > 0.5


def test_an_mr_series_is_refused_as_no_hounsfield_units():
    with pytest.raises(imaging.SkipVolume, match=r"an MR series \(Modality MR\)") as info:
        transforms.volume_from_file(_testdata("MR_small.dcm"))
    assert info.value.reason == imaging.NOT_HU


def test_a_bad_intensity_is_refused():
    with pytest.raises(transforms.InputFileError, match="'windowed:MAX'"):
        PREPROCESSING.volume(_testdata("MR_small.dcm"), "windowed:zero")


def test_a_crop_is_embedded_with_one_line_on_its_extent(tmp_path):
    _write_real_nifti(tmp_path / "crop.nii.gz", _real_ct(30), spacing=(0.7, 0.7, 1.25))
    _write_real_nifti(tmp_path / "chest.nii.gz", _real_ct(60), spacing=(2.8, 2.8, 5.0))
    with pytest.warns(imaging.ExtentWarning) as caught:
        PREPROCESSING.volume(tmp_path / "crop.nii.gz")
    (line,) = [str(w.message) for w in caught]
    assert line == (
        f"{tmp_path / 'crop.nii.gz'}: 38 mm superior-inferior x 90 x 90 mm across, 30 slices "
        "1.25 mm apart; the model trained on whole chests, 150 to 600 mm superior-inferior, "
        "200 to 550 mm across, slices at most 5 mm apart; embedded resized to 8 x 32 x 32 all "
        "the same"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", imaging.ExtentWarning)
        PREPROCESSING.volume(tmp_path / "chest.nii.gz")  # 300 x 358 x 358 mm: no line


# ------------------------------------------------------------------ one reader, two frameworks


def _both_readers():
    """The JAX side's and the PyTorch side's read_image / read_volume on one preprocessing."""
    jax_side = SimpleNamespace(preprocessing=PREPROCESSING)
    torch_side = SimpleNamespace(_files=lambda: PREPROCESSING)
    return (
        (
            functools.partial(inference.UniMedIInference.read_image, jax_side),
            functools.partial(torch_model.UniMedI.read_image, torch_side),
        ),
        (
            functools.partial(inference.UniMedIInference.read_volume, jax_side),
            functools.partial(torch_model.UniMedI.read_volume, torch_side),
        ),
    )


def test_torch_and_jax_readers_accept_and_refuse_the_same_files(tmp_path):
    images, volumes = _both_readers()
    (tmp_path / "README").write_text("not an X-ray")
    _write_real_nifti(tmp_path / "windowed.nii.gz", np.zeros((16, 128, 128), np.uint8))
    _write_slices(tmp_path / "short", 4, "1.2.3.4")
    cases = [
        (images, (_testdata("RG1_UNCR.dcm"),)),
        (images, (_testdata("JPGExtended.dcm"),)),
        (images, (tmp_path / "README",)),
        (images, (_testdata("reportsi.dcm"),)),
        (volumes, (tmp_path / "windowed.nii.gz",)),
        (volumes, (tmp_path / "windowed.nii.gz", "windowed:255")),
        (volumes, (_testdata("MR_small.dcm"),)),
        (volumes, (tmp_path / "short",)),
    ]
    refused = 0
    for (jax_read, torch_read), args in cases:
        try:
            want = jax_read(*args)
        except transforms.InputFileError as err:
            with pytest.raises(transforms.InputFileError) as info:
                torch_read(*args)
            assert str(info.value) == str(err)
            refused += 1
            continue
        np.testing.assert_array_equal(torch_read(*args).numpy(), want)
    assert refused == 5


# ------------------------------------------------------------------ embedding many files


def _stub_model(batch_size: int = 4) -> SimpleNamespace:
    """What embed_files uses of a model, embedding an input as its first 8 values and mean:
    the reading (real files, real decoders) is under test, not the network."""
    embed = lambda x: np.concatenate([x.reshape(len(x), -1)[:, :8], x.mean((1, 2))[:, None]], 1)
    return SimpleNamespace(
        preprocessing=PREPROCESSING,
        batch_size=batch_size,
        embed_images=embed,
        embed_volumes=lambda v: embed(v.reshape(len(v), -1, v.shape[-1])),
    )


def test_parallel_readers_give_what_one_reader_gives_with_progress(tmp_path):
    xray = imaging.read_image_2d(_testdata("RG1_UNCR.dcm"))[::8, ::8]
    for k in range(9):
        Image.fromarray(np.roll(xray, 7 * k, axis=1)).save(tmp_path / f"x{k}.png")
    shutil.copy(_testdata("RG1_J2KR.dcm"), tmp_path / "x9.dcm")
    (tmp_path / "x10.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    hu = np.clip(_real_ct(), -1000, 1000)
    _write_real_nifti(tmp_path / "ct.nii.gz", hu)
    _write_real_nifti(tmp_path / "w.nii.gz", np.rint((hu + 1000) / 2000 * 255).astype(np.uint8))
    lines: list[str] = []
    one = embed_files.embed_files(_stub_model(), [tmp_path])
    two = embed_files.embed_files(
        _stub_model(), [tmp_path], workers=2, progress=lines.append, every_s=0.0
    )
    assert two.paths == one.paths and len(one.paths) == 11
    np.testing.assert_array_equal(two.embeddings, one.embeddings)
    assert two.failed == one.failed and [Path(p).name for p, _ in one.failed] == [
        "x10.jpg",
        "w.nii.gz",
    ]
    assert two.notes == one.notes and [Path(p).name for p, _ in one.notes] == ["ct.nii.gz"]
    assert re.fullmatch(r"read and embedded 13/13 inputs, [\d.]+ files/s, ETA 0 s", lines[-1])
    done = [int(re.match(r"read and embedded (\d+)/13", line)[1]) for line in lines]
    assert done == sorted(done) and len(done) >= 4  # a line per batch or failure at every_s 0
