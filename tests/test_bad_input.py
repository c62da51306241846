"""Bad input of each kind is skipped with its reason and counted, in builds and in the training
pipeline; a dataset where too much of it fails stops with an error naming the dataset."""

import contextlib
import dataclasses
import gzip
import io
import struct
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import imaging, prepare, sources, train_stream
from data_pipelines.builders import (
    chexpert,
    common,
    covidx,
    ct_rate,
    luna16,
    mimic_cxr_jpg,
    rsna_pneumonia,
)
from data_pipelines.failure_limit import FailureLimit, TooManyFailuresError
from tests.damaged_records import damage_train_records
from tests.test_builders_real import (
    AXIAL,
    CT_RATE_AFFINE,
    MIMIC_REPORT,
    SPANISH,
    _bimcv_ct,
    _ct,
    _ct_rate_volume_path,
    _jpeg,
    _metadata,
    _nifti,
    _skip_totals,
    _text,
    _write_csv,
)
from tests.test_imaging import _write_xray
from tests.test_pipeline import N_TRAIN, _config, _take, data_dir, tokenizer  # noqa: F401

# ------------------------------------------------------------------------------ bad files


def _absurd_jpeg(path):
    """A valid small JPEG whose header claims 9000 x 8000 pixels."""
    _jpeg(path, 0)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    struct.pack_into(">HH", data, sof + 5, 9000, 8000)
    path.write_bytes(bytes(data))


def _dicom_without_pixels(path):
    _write_xray(path, np.zeros((4, 4)))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def _absurd_dicom(path):
    _write_xray(path, np.zeros((4, 4)))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(path)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _absurd_nifti(path):
    """A valid .nii.gz whose header claims 2048^3 voxels."""
    header = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<4h", header, 40, 3, 2048, 2048, 2048)  # dim[0..3]
    path.write_bytes(gzip.compress(bytes(header)))


def _nan_volume(seed):
    volume = _ct(seed, (64, 64, 20)).astype(np.float32)
    volume[10, 20, 5] = np.nan
    return volume


# -------------------------------------------------------------------------- 2D in a build


def _load_xray(path):
    """What an X-ray builder does with one file: a record, or why it is skipped."""
    if not Path(path).is_file():
        return common.MISSING_IMAGE
    try:
        return {"image": imaging.letterbox(imaging.read_image_2d(path), 32)}
    except imaging.SkipImage as skip:
        return skip.reason


X_RAYS = {
    "good-1.jpg": lambda p: _jpeg(p, 1),
    "good-2.jpg": lambda p: _jpeg(p, 2),
    "good-3.jpg": lambda p: _jpeg(p, 3),
    "truncated.jpg": lambda p: _jpeg(p, 4, truncate=True),
    "zero-bytes.jpg": lambda p: p.write_bytes(b""),
    "absurd.jpg": _absurd_jpeg,
    "no-pixels.dcm": _dicom_without_pixels,
    "absurd.dcm": _absurd_dicom,
    "missing.jpg": lambda p: None,
}
X_RAY_SKIPS = {"unreadable file": 2, "absurd size": 2, "no pixel data": 1, "missing image": 1}


@pytest.fixture
def xrays(tmp_path):
    """name -> path of each file of X_RAYS."""
    for name, write in X_RAYS.items():
        write(tmp_path / name)
    return {name: str(tmp_path / name) for name in X_RAYS}


def _builder():
    """What `common.generate` reads of a TFDS builder."""
    return SimpleNamespace(
        name="xrays",
        builder_config=SimpleNamespace(num_workers=0),
        info=SimpleNamespace(metadata={"skipped": {}}),
    )


def test_each_bad_2d_kind_is_skipped_with_its_reason(xrays):
    reasons = {name: _load_xray(path) for name, path in xrays.items()}
    assert reasons["truncated.jpg"] == reasons["zero-bytes.jpg"] == imaging.UNREADABLE
    assert reasons["absurd.jpg"] == reasons["absurd.dcm"] == imaging.ABSURD_SIZE
    assert reasons["no-pixels.dcm"] == imaging.NO_PIXEL_DATA
    assert reasons["missing.jpg"] == common.MISSING_IMAGE
    with pytest.raises(imaging.SkipImage, match=r"no pixel data: .*no-pixels\.dcm"):
        imaging.read_image_2d(xrays["no-pixels.dcm"])


def test_build_counts_2d_skips_and_stops_when_too_many_fail(xrays):
    xrays = list(xrays.values())
    builder = _builder()
    records = list(common.generate(builder, "train", xrays, _load_xray))
    assert [index for index, _ in records] == [0, 1, 2]
    assert builder.info.metadata["skipped"]["train"] == X_RAY_SKIPS
    # 6 of 9 inputs fail: above a 50% limit (judged from the first input on) the split stops.
    with (
        common.failure_limit(FailureLimit(0.5, min_count=1)),
        pytest.raises(TooManyFailuresError, match=r"xrays: split 'train': 6 of 9 inputs \(67%\)"),
    ):
        list(common.generate(_builder(), "train", xrays, _load_xray))
    with common.failure_limit(FailureLimit(0.7, min_count=1)):
        assert len(list(common.generate(_builder(), "train", xrays, _load_xray))) == 3


# -------------------------------------------------------------------------- 3D in a build

# subject -> (bad session's volume writer, its report cell; None: no row in sessions.tsv)
BAD_SESSIONS = {
    "sub-S00001": (lambda root, s: _bimcv_ct(root, s, "ses-E00012", 1), SPANISH),  # zero bytes
    "sub-S00002": (
        lambda root, s: _truncate(_bimcv_ct(root, s, "ses-E00022", 1, _ct(2, (64, 64, 20)))),
        SPANISH,
    ),
    "sub-S00003": (
        lambda root, s: _bimcv_ct(root, s, "ses-E00032", 1, _nan_volume(3)),
        SPANISH,
    ),
    "sub-S00004": (
        lambda root, s: _absurd_nifti(_bimcv_ct(root, s, "ses-E00042", 1, _ct(4, (64, 64, 20)))),
        SPANISH,
    ),
    "sub-S00005": (lambda root, s: _bimcv_ct(root, s, "ses-E00052", 1, _ct(5, (64, 64, 20))), None),
    "sub-S00006": (lambda root, s: _bimcv_ct(root, s, "ses-E00062", 1, _ct(6, (64, 64, 20))), "[]"),
}
VOLUME_SKIPS = {
    "unreadable file": 2,
    "NaN voxels": 1,
    "absurd size": 1,
    "missing report": 1,
    "empty report": 1,
}


@pytest.fixture
def bimcv_root(tmp_path):
    """Six subjects, each with one good CT session and one bad one of a different kind."""
    root = tmp_path / "bimcv"
    for n, (subject, (write_bad, cell)) in enumerate(BAD_SESSIONS.items(), start=1):
        good = f"ses-E000{n}1"
        _bimcv_ct(root, subject, good, 1, _ct(10 + n, (64, 64, 20)), AXIAL)
        write_bad(root, subject)
        rows = [[good, "20200401", SPANISH]]
        if cell is not None:
            rows.append([f"ses-E000{n}2", "20200402", cell])
        _write_csv(
            root / subject / f"{subject}_sessions.tsv",
            ["session_id", "study_date", "medical_evaluation"],
            rows,
            delimiter="\t",
        )
    return root


def test_each_bad_3d_kind_is_skipped_with_its_reason(bimcv_root):
    paths = {p.parent.parent.name: p for p in bimcv_root.glob("sub-*/ses-*2/mod-rx/*.nii.gz")}
    reasons = {}
    for session, path in sorted(paths.items()):
        try:
            imaging.prepare_volume(imaging.read_nifti(path), (8, 32, 32))
            reasons[session] = "kept"
        except imaging.SkipVolume as skip:
            assert str(path) in str(skip)
            reasons[session] = skip.reason
    assert reasons == {
        "ses-E00012": "unreadable file",  # zero bytes
        "ses-E00022": "unreadable file",  # truncated
        "ses-E00032": "NaN voxels",
        "ses-E00042": "absurd size",
        "ses-E00052": "kept",  # its report is missing
        "ses-E00062": "kept",  # its report is empty
    }


def test_build_counts_3d_skips_in_metadata_and_summary(bimcv_root, tmp_path):
    out = io.StringIO()
    argv = ["bimcv_covid19", f"--data_dir={tmp_path / 'data'}", f"--manual_dir={bimcv_root}"]
    with contextlib.redirect_stdout(out):
        assert prepare.run([*argv, "--num_workers=0", "--volume_shape=8,32,32"]) == 0
    assert _skip_totals(_metadata(tmp_path / "data", "bimcv_covid19")) == VOLUME_SKIPS
    summary = ", ".join(f"{reason} {n}" for reason, n in sorted(VOLUME_SKIPS.items()))
    assert f"skipped: {summary}" in out.getvalue()


def test_build_stops_when_too_many_inputs_fail(bimcv_root, tmp_path):
    with pytest.raises(TooManyFailuresError, match=r"bimcv_covid19: split '\w+': .* unusable"):
        prepare.ensure_prepared(
            "bimcv_covid19",
            tmp_path / "data",
            str(bimcv_root),
            FailureLimit(0.1, min_count=1),
            volume_shape=(8, 32, 32),
            num_workers=0,
        )
    assert not (tmp_path / "data" / "bimcv_covid19" / "ct" / "1.0.0").exists()


# ------------------------------------------------------------------------- the pipeline


def _cut_short(record, features):
    return record[: len(record) // 2]


def _empty_report(record, features):
    example = features.deserialize_example_np(record)
    return features.serialize_example({**example, "report": ""})


def test_pipeline_replaces_and_counts_bad_records(data_dir, tokenizer, tmp_path):  # noqa: F811
    damage = {3: _cut_short, 5: _empty_report, 7: lambda record, features: b"\x0a\xff"}
    copy = damage_train_records(data_dir, tmp_path / "data", "phantoms/xray", damage)
    stream = train_stream.TrainStream(_config(copy, sources_3d=""), tokenizer)
    batches = _take(stream, N_TRAIN // 8)  # one epoch: each record is drawn once
    assert all(np.isfinite(b["image"]).all() for b in batches)
    assert stream.skipped == {
        f"phantoms/xray: {train_stream.UNDECODABLE}": 2,
        f"phantoms/xray: {train_stream.EMPTY_REPORT}": 1,
    }
    assert stream.reads == {"phantoms/xray": N_TRAIN + 3}
    assert stream.skip_metrics() == {
        "data_skipped": 3,
        "data_skipped/phantoms/xray: empty report": 1,
        "data_skipped/phantoms/xray: undecodable record": 2,
    }
    assert stream.get_state()["reads"] == {"phantoms/xray": N_TRAIN + 3}


@dataclasses.dataclass(frozen=True)
class _ListSource(sources.Source):
    """A source whose records are given, for kinds no prepared dataset stores (float arrays)."""

    records: tuple = ()

    def open(self):
        return self.records


def test_pipeline_replaces_volumes_with_nan_values():
    good = {"volume": np.zeros((2, 4, 4), np.float32), "report": b"Clear lungs."}
    bad = {**good, "volume": np.full((2, 4, 4), np.nan, np.float32)}
    records = (bad, *[good] * 7)
    source = _ListSource("floats/ct", Path("x"), "train", 8, (2, 4, 4), np.float32, records=records)
    loader = train_stream._RecordLoader("3d", [source], seed=0, crop=4, window=(-1000.0, 1000.0))
    loaded = loader((0, 0, 0))
    assert np.isfinite(loaded.array).all() and loaded.report == "Clear lungs."
    assert loaded.skipped == [f"floats/ct: {train_stream.NON_FINITE}"]


def test_pipeline_stops_when_a_source_fails_too_often(data_dir, tokenizer, tmp_path):  # noqa: F811
    damage = {i: _cut_short for i in range(0, N_TRAIN, 2)}  # half the records
    copy = damage_train_records(data_dir, tmp_path / "data", "phantoms/xray", damage)
    config = _config(copy, sources_3d="", max_failure_fraction=0.2)
    with pytest.raises(TooManyFailuresError, match=r"phantoms/xray in .*: \d+ of \d+ inputs"):
        _take(train_stream.TrainStream(config, tokenizer), 40)
    config.data.max_failure_fraction = 0.7
    assert len(_take(train_stream.TrainStream(config, tokenizer), 20)) == 20


# --------------------------------------------------------------- paths that leave manual_dir


def test_within_judges_the_lexical_path(tmp_path):
    root = tmp_path / "raw"
    assert common.within(root, "files", "a.jpg") == root / "files" / "a.jpg"
    assert common.within(root, "files/p1/..", "b.jpg") == root / "files" / "b.jpg"
    assert common.within(root, "files", "../c.jpg") == root / "c.jpg"
    assert common.within(root, "files", "../../d.jpg") is None
    assert common.within(root, "files", "p1", "../../../e.jpg") is None
    assert common.within(root, "/etc/passwd") is None
    assert common.within(root, "files", str(root / "f.jpg")) is None  # absolute, even inside
    assert common.within(tmp_path / "raw/", "..", "raw2", "g.jpg") is None  # a sibling folder
    # A symlink inside the folder stays usable wherever it points; `..` after it is lexical.
    (tmp_path / "elsewhere").mkdir()
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    assert common.within(root, "link", "h.jpg") == root / "link" / "h.jpg"
    assert common.within(root, "link", "..", "..", "h.jpg") is None


def _mimic_root(tmp_path, images, reports):
    """A MIMIC-CXR-JPG folder with `images` (dicom_id, subject, study, split, writer of the
    JPEG at its path or None) and `reports` (study -> bytes of sNNN.txt)."""
    root = tmp_path / "mimic"
    for dicom, subject, study, _, write in images:
        study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        if write is not None:
            path = study_dir / f"s{study}" / f"{dicom}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
        if study in reports:
            (study_dir / f"s{study}.txt").write_bytes(reports[study])
    rows = [(d, sub, st, split) for d, sub, st, split, _ in images]
    _write_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        ["dicom_id", "subject_id", "study_id", "ViewPosition"],
        [[d, sub, st, "PA"] for d, sub, st, _ in rows],
    )
    _write_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, sub, split] for d, sub, st, split in rows],
    )
    _write_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz",
        ["subject_id", "study_id", *mimic_cxr_jpg.CHEXPERT_LABELS],
        [],
    )
    return root


def _flat_jpeg(path, height, width):
    """8 x 8 pixels of JPEG data under a header that claims `height` x `width`: PIL decodes
    it without complaint, the rest of the image a flat grey."""
    _jpeg_of(path, np.random.default_rng(0).integers(0, 255, (8, 8)))
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    path.write_bytes(bytes(data))


def _jpeg_of(path, pixels):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, format="JPEG", quality=95)


MIMIC_GOOD = MIMIC_REPORT.encode()
LATIN1_REPORT = MIMIC_REPORT.replace("The lungs are clear.", "Pulmón claro.").encode("latin-1")


def test_mimic_build_skips_escaping_paths_bad_reports_and_blank_images(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _jpeg(outside / "evil.jpg", 9)  # a readable JPEG the metadata points at from inside
    _jpeg(outside / "linked.jpg", 8)  # reached through a symlink placed inside the folder

    def link(path):
        path.symlink_to(outside / "linked.jpg")

    escape = "../../../../../outside/evil"  # from files/pXX/pNNN/sNNN/ up to tmp_path
    images = [
        ("g1", "10000001", "50000001", "train", lambda p: _jpeg(p, 1)),
        ("lnk", "10000001", "50000001", "train", link),
        (escape, "10000001", "50000001", "train", None),
        ("latin", "10000002", "50000002", "train", lambda p: _jpeg(p, 2)),
        ("tiny", "10000003", "50000003", "train", lambda p: _jpeg_of(p, [[128]])),
        ("flat", "10000003", "50000003", "train", lambda p: _flat_jpeg(p, 8000, 8000)),
        ("g2", "10000004", "50000004", "validate", lambda p: _jpeg(p, 3)),
        ("g3", "10000005", "50000005", "test", lambda p: _jpeg(p, 4)),
    ]
    reports = {f"5000000{n}": MIMIC_GOOD for n in (1, 3, 4, 5)} | {"50000002": LATIN1_REPORT}
    root = _mimic_root(tmp_path, images, reports)
    prepared = tmp_path / "data"
    argv = ["mimic_cxr_jpg", f"--data_dir={prepared}", f"--manual_dir={root}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert prepare.run([*argv, "--image_size=32", "--num_workers=0"]) == 0
    train = _records_of(prepared / "mimic_cxr_jpg" / "xray" / "1.0.0", "train")
    assert [_text(r["id"]) for r in train] == ["g1", "lnk"]  # the symlink inside still works
    expected = imaging.letterbox(imaging.read_image_2d(outside / "linked.jpg"), 32)
    np.testing.assert_array_equal(train[1]["image"], expected)
    metadata = _metadata(prepared, "mimic_cxr_jpg")
    assert metadata["skipped"]["train"] == {
        "path outside manual_dir": 1,
        "unreadable report": 1,
        "too small": 1,
        "constant image": 1,
    }
    files = metadata["skipped_files"]["train"]
    assert escape in files["path outside manual_dir"][0]
    assert "mimic-cxr-2.0.0-metadata.csv.gz" in files["path outside manual_dir"][0]
    latin = root / "files" / "p10" / "p10000002" / "s50000002.txt"
    assert str(latin) in files["unreadable report"][0]
    assert "flat.jpg" in files["constant image"][0] and "tiny.jpg" in files["too small"][0]
    summary = out.getvalue().split("\nSummary\n")[1]
    for reason, where in (("unreadable report", str(latin)), ("path outside", escape)):
        line = next(line for line in summary.splitlines() if line.strip().startswith(reason))
        assert where in line, summary


def _records_of(path, split):
    return list(tfds.builder_from_directory(path).as_data_source(split))


def test_ct_rate_absolute_volume_name_is_skipped(tmp_path):
    root, outside = tmp_path / "ct-rate", tmp_path / "outside"
    volume = lambda seed: _ct(seed, (64, 64, 16)) + 1024
    names = ["train_1_a_1", "train_2_a_1", "train_3_a_1", "valid_1_a_1"]
    for seed, name in enumerate(names):
        _nifti(_ct_rate_volume_path(root, name), volume(seed), CT_RATE_AFFINE)
    evil = f"{outside}/train_9_a_1.nii.gz"  # an absolute VolumeName
    _nifti(outside / "train_9_a_1.nii.gz", volume(9), CT_RATE_AFFINE)
    report = "Trachea is open. No pleural effusion. Heart size is normal."
    for part, stem, labels in (
        ("train", "train", "train"),
        ("valid", "validation", "valid"),
    ):
        rows = [f"{n}.nii.gz" for n in names if n.startswith(part)]
        rows += [evil] if part == "train" else []
        _write_csv(
            root / "radiology_text_reports" / f"{stem}_reports.csv",
            ["VolumeName", "Findings_EN", "Impressions_EN"],
            [[n, report, "No acute findings."] for n in rows],
        )
        _write_csv(
            root / "metadata" / f"{stem}_metadata.csv",
            ["VolumeName", "RescaleSlope", "RescaleIntercept"],
            [[n, 1, -1024] for n in rows],
        )
        _write_csv(
            root / "multi_abnormality_labels" / f"{labels}_predicted_labels.csv",
            ["VolumeName", *ct_rate.ABNORMALITIES],
            [[n, *[0] * 18] for n in rows],
        )
    prepared = tmp_path / "data"
    prepare.ensure_prepared("ct_rate", prepared, str(root), volume_shape=(8, 32, 32), num_workers=0)
    path = prepared / "ct_rate" / "ct" / "1.0.0"
    ids = {_text(r["id"]) for s in ("train", "validation", "test") for r in _records_of(path, s)}
    assert ids == {n for n in names}
    metadata = _metadata(prepared, "ct_rate")
    assert _skip_totals(metadata) == {"path outside manual_dir": 1}
    assert evil in metadata["skipped_files"]["train"]["path outside manual_dir"][0]


def test_eval_builders_skip_paths_outside_manual_dir(tmp_path):
    root = tmp_path / "raw"
    outside = "../../outside.jpg"
    # CheXpert: the Path cell, with `..` steps or absolute.
    header = ["Path", "Frontal/Lateral", "AP/PA", *chexpert.CLASS_NAMES]
    cells = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/train/patient00001/study1/../../../../outside.jpg",
        "/etc/train/patient00002/study1/view1_frontal.jpg",
    ]
    _write_csv(root / "train.csv", header, [[c, "Frontal", "AP", *[""] * 5] for c in cells])
    images = chexpert._images(root, "train.csv", chexpert.uncertain_values("paper"), 16)
    assert images[0].path == str(root / "train/patient00001/study1/view1_frontal.jpg")
    assert [str(i) for i in images[1:]] == [common.PATH_OUTSIDE] * 2
    assert "train.csv line 3" in images[1].file and cells[1] in images[1].file
    # RSNA: the patientId names the DICOM.
    _write_csv(
        root / rsna_pneumonia.LABELS,
        ["patientId", "x", "y", "width", "height", "Target"],
        [["p1", "", "", "", "", 0], ["../../outside", "", "", "", "", 0]],
    )
    patients = rsna_pneumonia._patients(root, 16)
    assert patients[0].path == str(root / rsna_pneumonia.IMAGES / "p1.dcm")
    assert str(patients[1]) == common.PATH_OUTSIDE and "../../outside" in patients[1].file
    # COVIDx: the file name of a split-file line.
    (root / "train.txt").write_text(f"1 a.png normal src\n2 {outside} normal src\n")
    lines = covidx.read_split_file(root / "train.txt", root / "train", 16)
    assert lines[0].path == str(root / "train" / "a.png")
    assert str(lines[1]) == common.PATH_OUTSIDE and "train.txt line 2" in lines[1].file
    # LUNA16: the data file an .mhd header names.
    voxels = np.zeros((16, 64, 64), np.int16)
    mhd = root / "subset0" / "1.2.3.mhd"
    _luna_mhd(mhd, voxels, "1.2.3.raw")
    assert luna16.read_metaimage(mhd, root).hu.shape == (16, 64, 64)
    (tmp_path / "secret.raw").write_bytes(voxels.tobytes())
    for data_file in ("../../secret.raw", str(tmp_path / "secret.raw")):
        _luna_mhd(mhd, voxels, data_file)
        with pytest.raises(imaging.SkipVolume, match=r"path outside manual_dir: .*1\.2\.3\.mhd"):
            luna16.read_metaimage(mhd, root)


def _luna_mhd(path, voxels, data_file):
    path.parent.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = voxels.shape
    path.write_text(
        f"NDims = 3\nDimSize = {nx} {ny} {nz}\nElementType = MET_SHORT\n"
        f"ElementDataFile = {data_file}\n"
    )
    (path.parent / "1.2.3.raw").write_bytes(voxels.astype("<i2").tobytes())


def test_paths_outside_count_as_failures(tmp_path):
    tasks = [common.Skip(common.PATH_OUTSIDE, f"table line {n}") for n in range(3)]
    tasks.append(str(tmp_path))
    with (
        common.failure_limit(FailureLimit(0.5, min_count=1)),
        pytest.raises(
            TooManyFailuresError,
            match=r"3 of 4 inputs .*path outside manual_dir 3.*First of them: path outside "
            r"manual_dir: table line 0\.",
        ),
    ):
        list(common.generate(_builder(), "train", tasks, lambda path: {"path": path}))


# ---------------------------------------------------- per-file problems skip a record (item 5)


def _sessions_tsv(path, rows):
    _write_csv(path, ["session_id", "medical_evaluation"], rows, delimiter="\t")


def test_bimcv_bad_sessions_file_skips_that_subjects_sessions(tmp_path):
    root = tmp_path / "bimcv"
    subjects = [f"sub-S0000{n}" for n in range(1, 9)]
    seed = next(  # a seed that puts both bad subjects in 'train'
        s
        for s in range(100)
        if {
            common.split_groups(subjects, {"validation": 0.05, "test": 0.05}, s)[b]
            for b in subjects[:2]
        }
        == {"train"}
    )
    for n, subject in enumerate(subjects, start=1):
        _bimcv_ct(root, subject, f"ses-E000{n}1", 1, _ct(n, (64, 64, 20)), AXIAL)
        _sessions_tsv(root / subject / f"{subject}_sessions.tsv", [[f"ses-E000{n}1", SPANISH]])
    latin = root / subjects[0] / f"{subjects[0]}_sessions.tsv"
    latin.write_bytes(f"session_id\tmedical_evaluation\nses-E00011\t{SPANISH}\n".encode("latin-1"))
    empty = root / subjects[1] / f"{subjects[1]}_sessions.tsv"
    empty.write_bytes(b"")
    out = io.StringIO()
    argv = ["bimcv_covid19", f"--data_dir={tmp_path / 'data'}", f"--manual_dir={root}"]
    with contextlib.redirect_stdout(out):
        assert prepare.run([*argv, "--volume_shape=8,32,32", f"--seed={seed}"]) == 0
    metadata = _metadata(tmp_path / "data", "bimcv_covid19")
    assert _skip_totals(metadata) == {"unreadable report": 2}
    files = metadata["skipped_files"]["train"]["unreadable report"]
    assert sorted(f.split(":")[0] for f in files) == sorted([str(latin), str(empty)])
    assert str(latin) in out.getvalue().split("\nSummary\n")[1]


def _zeros_nifti_gz(path, shape, dtype):
    """A .nii.gz of zeros written in chunks, never held whole in memory."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    left = int(np.prod(shape)) * np.dtype(dtype).itemsize
    chunk = bytes(2**24)
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4)
        while left:
            handle.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))


def test_volume_size_limit_counts_bytes(tmp_path):
    # 512 x 512 x 300 float64 zeros: under 2^29 voxels, 600 MiB of data from a 0.6 MB file.
    path = tmp_path / "zeros.nii.gz"
    _zeros_nifti_gz(path, (512, 512, 300), np.float64)
    assert path.stat().st_size < 2**22
    with pytest.raises(imaging.SkipVolume, match=r"absurd size: .*zeros\.nii\.gz.*bytes"):
        imaging.read_nifti(path)


def test_dicom_size_limit_counts_bytes(tmp_path):
    # 6000 x 6000 16-bit: 36M pixels (under 2^26) but 72 MB of pixel data (over 2^26 bytes).
    path = tmp_path / "wide.dcm"
    _write_xray(path, np.zeros((4, 4)))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 6000, 6000
    ds.save_as(path)
    with pytest.raises(imaging.SkipImage, match=r"absurd size: .*wide\.dcm"):
        imaging.read_image_2d(path)
