"""Bad input of each kind is skipped with its reason and counted, in builds and in the training
pipeline; a dataset where too much of it fails stops with an error naming the dataset."""

import contextlib
import dataclasses
import gzip
import io
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from data_pipelines import imaging, pipeline, prepare
from data_pipelines.builders import common
from data_pipelines.failure_limit import FailureLimit, TooManyFailuresError
from tests.damaged_records import damage_train_records
from tests.test_builders_real import (
    AXIAL,
    SPANISH,
    _bimcv_ct,
    _ct,
    _jpeg,
    _metadata,
    _skip_totals,
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
        assert prepare.main([*argv, "--num_workers=0", "--volume_shape=8,32,32"]) == 0
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
    stream = pipeline.TrainStream(_config(copy, sources_3d=""), tokenizer)
    batches = _take(stream, N_TRAIN // 8)  # one epoch: each record is drawn once
    assert all(np.isfinite(b["image"]).all() for b in batches)
    assert stream.skipped == {
        f"phantoms/xray: {pipeline.UNDECODABLE}": 2,
        f"phantoms/xray: {pipeline.EMPTY_REPORT}": 1,
    }
    assert stream.reads == {"phantoms/xray": N_TRAIN + 3}
    assert stream.skip_metrics() == {
        "data_skipped": 3,
        "data_skipped/phantoms/xray: empty report": 1,
        "data_skipped/phantoms/xray: undecodable record": 2,
    }
    assert stream.get_state()["reads"] == {"phantoms/xray": N_TRAIN + 3}


@dataclasses.dataclass(frozen=True)
class _ListSource(pipeline.Source):
    """A source whose records are given, for kinds no prepared dataset stores (float arrays)."""

    records: tuple = ()

    def open(self):
        return self.records


def test_pipeline_replaces_volumes_with_nan_values():
    good = {"volume": np.zeros((2, 4, 4), np.float32), "report": b"Clear lungs."}
    bad = {**good, "volume": np.full((2, 4, 4), np.nan, np.float32)}
    records = (bad, *[good] * 7)
    source = _ListSource("floats/ct", Path("x"), "train", 8, (2, 4, 4), np.float32, records=records)
    loader = pipeline._RecordLoader("3d", [source], seed=0, crop=4, window=(-1000.0, 1000.0))
    volume, report, skipped = loader((0, 0, 0))
    assert np.isfinite(volume).all() and report == "Clear lungs."
    assert skipped == [f"floats/ct: {pipeline.NON_FINITE}"]


def test_pipeline_stops_when_a_source_fails_too_often(data_dir, tokenizer, tmp_path):  # noqa: F811
    damage = {i: _cut_short for i in range(0, N_TRAIN, 2)}  # half the records
    copy = damage_train_records(data_dir, tmp_path / "data", "phantoms/xray", damage)
    config = _config(copy, sources_3d="", max_failure_fraction=0.2)
    with pytest.raises(TooManyFailuresError, match=r"phantoms/xray in .*: \d+ of \d+ inputs"):
        _take(pipeline.TrainStream(config, tokenizer), 40)
    config.data.max_failure_fraction = 0.7
    assert len(_take(pipeline.TrainStream(config, tokenizer), 20)) == 20
