"""Real-dataset builders on tiny fixtures laid out exactly like MIMIC-CXR-JPG, BIMCV-COVID19+
and CT-RATE: what is kept, what is skipped and why, labels, splits, HU, layout errors."""

import contextlib
import csv
import gzip
import io
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs.pretrain import get_config
from data_pipelines import eval_split, imaging, prepare, train_stream, transforms
from data_pipelines.builders import bimcv_covid19, common, ct_rate, mimic_cxr_jpg

IMAGE_SIZE, VOLUME = 32, (8, 32, 32)
SERIAL = {"num_workers": 0}


def _write_csv(path, columns, rows, delimiter=","):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _records(data_dir, name, split):
    config = {"mimic_cxr_jpg": "xray"}.get(name, "ct")
    path = data_dir / name / config / "1.0.0"
    return list(tfds.builder_from_directory(path).as_data_source(split))


def _metadata(data_dir, name):
    config = {"mimic_cxr_jpg": "xray"}.get(name, "ct")
    return json.loads((data_dir / name / config / "1.0.0" / "metadata.json").read_text())


def _skip_totals(metadata):
    """reason -> inputs skipped, over all splits."""
    totals: dict[str, int] = {}
    for reasons in metadata["skipped"].values():
        for reason, n in reasons.items():
            totals[reason] = totals.get(reason, 0) + n
    return totals


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


# ------------------------------------------------------------------------------ MIMIC-CXR-JPG

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:

 The lungs are clear.  There is no pleural
 effusion.  The heart size is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
MIMIC_TEXT = (
    "The lungs are clear. There is no pleural effusion. The heart size is normal. "
    "No acute cardiopulmonary process."
)
SHORT_REPORT = " FINDINGS: No acute process.\n"
# dicom_id, subject, study, ViewPosition, split, what happens to it
MIMIC_IMAGES = [
    ("d01", "10000032", "50000001", "PA", "train", "kept"),
    ("d02", "10000032", "50000001", "LATERAL", "train", "lateral view"),
    ("d03", "10000032", "50000002", "AP", "train", "short report"),
    ("d04", "10002013", "50000003", "PA", "train", "unreadable file"),
    ("d05", "10002013", "50000003", "AP", "train", "kept"),
    ("d06", "10002013", "50000003", "", "train", "other view"),
    ("d07", "10002013", "50000003", "LL", "train", "lateral view"),
    ("d08", "10002013", "50000003", "PA", "train", "missing image"),
    ("d09", "10000764", "50000004", "PA", "validate", "kept"),
    ("d10", "10001122", "50000005", "AP", "test", "kept"),
    ("d11", "10001122", "50000006", "PA", "test", "missing report"),
    ("d12", "10001122", "50000005", "PA", None, "not in split file"),
]
STUDY_REPORTS = {"50000001": MIMIC_REPORT, "50000002": SHORT_REPORT}
STUDY_REPORTS |= {s: MIMIC_REPORT for s in ("50000003", "50000004", "50000005")}
# CheXpert: Atelectasis 1, Cardiomegaly -1, Consolidation 0, the rest not mentioned (blank).
CHEXPERT_ROW = ["1.0", "-1.0", "0.0"] + [""] * 11


def _jpeg(path, seed, truncate=False):
    rng = np.random.default_rng(seed)
    pixels = (np.linspace(0, 200, 50)[None, :] + rng.integers(0, 50, (40, 50))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2] if truncate else data)


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic-cxr-jpg")
    for i, (dicom, subject, study, _, _, fate) in enumerate(MIMIC_IMAGES):
        study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        if fate != "missing image":
            _jpeg(study_dir / f"s{study}" / f"{dicom}.jpg", i, truncate=fate == "unreadable file")
        if study in STUDY_REPORTS:
            (study_dir / f"s{study}.txt").write_text(STUDY_REPORTS[study])
    meta_columns = [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
        "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
        "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]  # fmt: skip
    _write_csv(
        root / mimic_cxr_jpg.METADATA,
        meta_columns,
        [
            [d, sub, st, "CHEST (PA AND LAT)", view, 40, 50, 21800506, 213014.531,
             "CHEST (PA AND LAT)", "postero-anterior", "Erect"]
            for d, sub, st, view, _, _ in MIMIC_IMAGES
        ],
    )  # fmt: skip
    _write_csv(
        root / mimic_cxr_jpg.SPLIT,
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, sub, split] for d, sub, st, _, split, _ in MIMIC_IMAGES if split],
    )
    _write_csv(
        root / mimic_cxr_jpg.CHEXPERT,
        ["subject_id", "study_id", *mimic_cxr_jpg.CHEXPERT_LABELS],
        [["10000032", "50000001", *CHEXPERT_ROW], ["10000764", "50000004", *CHEXPERT_ROW]],
    )
    return root


# ----------------------------------------------------------------------------- BIMCV-COVID19+

AXIAL = np.array([[-0.7, 0, 0, 22.0], [0, -0.7, 0, 40.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
# Sagittal acquisition: array axis 0 runs left-right in 3 mm slices, 1 and 2 are A-P and S-I.
SAGITTAL = np.array([[3.0, 0, 0, -30.0], [0, -0.7, 0, 40.0], [0, 0, 0.7, -300.0], [0, 0, 0, 1]])
SPANISH = (
    "['Se observan opacidades en vidrio deslustrado bilaterales de predominio periférico.', "
    "'No se observa derrame pleural.', 'Silueta cardiaca de tamaño normal.']"
)
SPANISH_TEXT = (
    "Se observan opacidades en vidrio deslustrado bilaterales de predominio periférico. "
    "No se observa derrame pleural. Silueta cardiaca de tamaño normal."
)


def _ct(seed, shape):
    """A CT-like int16 volume with per-voxel structure (so resizes are distinguishable)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 400, shape).astype(np.int16)


def _nifti(path, data, affine, slope_inter=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, path)
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text('{"Modality": "CT"}')


def _bimcv_ct(root, subject, session, run, data=None, affine=AXIAL, seed=0):
    name = f"{subject}_{session}_run-{run}_bp-chest_ct.nii.gz"
    path = root / subject / session / "mod-rx" / name
    if data is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # zero-byte download
    else:
        _nifti(path, data, affine)
    return path


# subject -> session -> report cell (None: no row in sessions.tsv)
BIMCV_REPORTS = {
    "sub-S00001": {"ses-E00001": SPANISH, "ses-E00002": SPANISH},
    "sub-S00002": {"ses-E00003": SPANISH, "ses-E00004": SPANISH},
    "sub-S00003": {"ses-E00005": SPANISH, "ses-E00006": "['Sin hallazgos.']"},
    "sub-S00004": {"ses-E00007": SPANISH, "ses-E00010": SPANISH},
    "sub-S00005": {"ses-E00008": SPANISH},
}
BIMCV_KEPT = {  # session -> id of the run kept
    "ses-E00001": "sub-S00001_ses-E00001_run-2_bp-chest_ct",
    "ses-E00003": "sub-S00002_ses-E00003_run-1_bp-chest_ct",
    "ses-E00005": "sub-S00003_ses-E00005_run-1_bp-chest_ct",
    "ses-E00007": "sub-S00004_ses-E00007_run-1_bp-chest_ct",
    "ses-E00008": "sub-S00005_ses-E00008_run-1_bp-chest_ct",
}
BIMCV_SKIPPED = {"not axial": 1, "unreadable file": 1, "short report": 1, "missing report": 1}


@pytest.fixture(scope="module")
def bimcv_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("covid19_posi")
    axial = lambda seed, slices=20: _ct(seed, (64, 64, slices))
    # Two axial runs: the one with more slices is kept. Then a sagittal-only session.
    _bimcv_ct(root, "sub-S00001", "ses-E00001", 1, axial(1, 16))
    _bimcv_ct(root, "sub-S00001", "ses-E00001", 2, axial(2, 24))
    _bimcv_ct(root, "sub-S00001", "ses-E00002", 1, _ct(3, (20, 64, 64)), SAGITTAL)
    # A sagittal run spanning more S-I voxels than the axial one: the axial one is kept.
    _bimcv_ct(root, "sub-S00002", "ses-E00003", 1, axial(4))
    _bimcv_ct(root, "sub-S00002", "ses-E00003", 2, _ct(5, (20, 64, 64)), SAGITTAL)
    _bimcv_ct(root, "sub-S00002", "ses-E00004", 1)  # zero bytes
    _bimcv_ct(root, "sub-S00003", "ses-E00005", 1, axial(6))
    _bimcv_ct(root, "sub-S00003", "ses-E00006", 1, axial(7))  # short report
    _bimcv_ct(root, "sub-S00004", "ses-E00007", 1, axial(8))
    xray = root / "sub-S00004" / "ses-E00010" / "mod-rx" / "sub-S00004_ses-E00010_run-1_cr.png"
    xray.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(xray)  # an X-ray session: not read
    _bimcv_ct(root, "sub-S00005", "ses-E00008", 1, axial(9))
    _bimcv_ct(root, "sub-S00005", "ses-E00009", 1, axial(10))  # not in sessions.tsv
    for subject, sessions in BIMCV_REPORTS.items():
        _write_csv(
            root / subject / f"{subject}_sessions.tsv",
            ["session_id", "study_date", "medical_evaluation"],
            [[s, "20200401", cell] for s, cell in sessions.items()],
            delimiter="\t",
        )
    return root


# ---------------------------------------------------------------------------------- CT-RATE

CT_RATE_AFFINE = np.array([[-0.75, 0, 0, 190.0], [0, -0.75, 0, 150.0], [0, 0, 1.5, -350.0],
                           [0, 0, 0, 1]])  # fmt: skip
CT_FINDINGS = "Trachea and both main bronchi are open. No pleural effusion. Heart size is normal."
CT_IMPRESSION = "No acute findings."
CT_SHAPE = (64, 64, 16)  # CT-RATE stores x, y, then slices


def _constant(value):
    return np.full(CT_SHAPE, value, np.int16)


# VolumeName stem -> (raw data or None for no file, header scaling, metadata (slope, intercept)
# or None for no row, report, fate). Known HU of the kept constant volumes in CT_RATE_HU.
CT_RATE = {
    "train_1_a_1": (_constant(1024), None, (1, -1024), "full", "kept"),
    "train_1_a_2": (_ct(11, CT_SHAPE) + 1024, None, (1, -1024), "full", "kept"),
    "train_2_a_1": (_constant(1024), (1.0, -1024.0), (1, -1024), "full", "kept"),
    "train_2_a_2": (_constant(-1000), None, (1, -1024), "full", "implausible HU"),
    "train_3_a_1": (_constant(1100), None, (2, -2048), "full", "kept"),
    "train_3_a_2": (_constant(1100), None, None, "full", "missing rescale"),
    "train_4_a_1": (_ct(12, CT_SHAPE) + 1024, None, (1, -1024), "full", "kept"),
    "train_4_b_1": (_ct(13, CT_SHAPE) + 1024, None, (1, -1024), "short", "short report"),
    "train_5_a_1": (_ct(14, CT_SHAPE) + 1024, None, (1, -1024), "full", "kept"),
    "train_5_a_2": (None, None, (1, -1024), "full", "missing volume"),
    "valid_1_a_1": (_ct(15, CT_SHAPE) + 1024, None, (1, -1024), "full", "kept"),
    "valid_2_a_1": (_constant(1074), None, (1, -1024), "full", "kept"),
}
CT_RATE_HU = {"train_1_a_1": 0, "train_2_a_1": 0, "train_3_a_1": 152, "valid_2_a_1": 50}
LABELS_ROW = [1, 0, 1] + [0] * 15


def _ct_rate_volume_path(root, name):
    part, patient, scan, _ = name.split("_")
    return (
        root / "dataset" / part / f"{part}_{patient}" / f"{part}_{patient}_{scan}"
        / f"{name}.nii.gz"
    )  # fmt: skip


@pytest.fixture(scope="module")
def ct_rate_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("CT-RATE")
    for name, (data, scaling, _, _, _) in CT_RATE.items():
        if data is not None:
            _nifti(_ct_rate_volume_path(root, name), data, CT_RATE_AFFINE, scaling)
    report_columns = [
        "VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN",
    ]  # fmt: skip
    meta_columns = [
        "VolumeName", "Manufacturer", "RescaleSlope", "RescaleIntercept", "XYSpacing",
        "ZSpacing", "Rows", "Columns",
    ]  # fmt: skip
    for part, reports, metadata, labels in (
        ("train", "train_reports", "train_metadata", "train_predicted_labels"),
        ("valid", "validation_reports", "validation_metadata", "valid_predicted_labels"),
    ):
        names = [n for n in CT_RATE if n.startswith(part)]
        report = lambda n: CT_FINDINGS if CT_RATE[n][3] == "full" else "Not given."
        _write_csv(
            root / "radiology_text_reports" / f"{reports}.csv",
            report_columns,
            [[f"{n}.nii.gz", "Cough.", "Non-contrast.", report(n), CT_IMPRESSION] for n in names],
        )
        _write_csv(
            root / "metadata" / f"{metadata}.csv",
            meta_columns,
            [
                [f"{n}.nii.gz", "SIEMENS", *CT_RATE[n][2], "[0.75, 0.75]", 1.5, 64, 64]
                for n in names
                if CT_RATE[n][2] is not None
            ],
        )
        _write_csv(
            root / "multi_abnormality_labels" / f"{labels}.csv",
            ["VolumeName", *ct_rate.ABNORMALITIES],
            [[f"{n}.nii.gz", *LABELS_ROW] for n in names if n != "train_1_a_2"],
        )
    return root


# ------------------------------------------------------------------------------------ builds


@pytest.fixture(scope="module")
def built(tmp_path_factory, mimic_root, bimcv_root, ct_rate_root):
    """All three built through the CLI into one data_dir; returns (data_dir, stdout)."""
    data_dir = tmp_path_factory.mktemp("data")
    out = io.StringIO()
    sizes = {
        "mimic_cxr_jpg": (mimic_root, [f"--image_size={IMAGE_SIZE}"]),
        "bimcv_covid19": (bimcv_root, ["--volume_shape=8,32,32"]),
        "ct_rate": (ct_rate_root, ["--volume_shape=8,32,32"]),
    }
    with contextlib.redirect_stdout(out):
        for name, (root, extra) in sizes.items():
            argv = [name, f"--data_dir={data_dir}", f"--manual_dir={root}", "--num_workers=0"]
            assert prepare.run(argv + extra) == 0
    return data_dir, out.getvalue()


# ---------------------------------------------------------------------------- MIMIC tests


def test_mimic_keeps_frontal_images_with_reports_in_official_splits(built, mimic_root):
    data_dir, _ = built
    kept = {"train": ["d01", "d05"], "validation": ["d09"], "test": ["d10"]}
    for split, dicoms in kept.items():
        records = _records(data_dir, "mimic_cxr_jpg", split)
        assert [_text(r["id"]) for r in records] == dicoms
        for record in records:
            row = next(r for r in MIMIC_IMAGES if r[0] == _text(record["dicom_id"]))
            assert _text(record["view"]) == row[3] and _text(record["subject_id"]) == row[1]
            assert _text(record["report"]) == MIMIC_TEXT and record["num_sentences"] == 4
            assert record["image"].dtype == np.uint8
            assert record["image"].shape == (IMAGE_SIZE, IMAGE_SIZE)
            jpeg = mimic_root / "files" / "p10" / f"p{row[1]}" / f"s{row[2]}" / f"{row[0]}.jpg"
            want = imaging.letterbox(imaging.read_image_2d(jpeg), IMAGE_SIZE)
            np.testing.assert_array_equal(record["image"], want)


def _eval_rows(data_dir, name, modality, split, crop=24):
    """id -> the eval pipeline's model input of each record of a prepared split."""
    config = get_config("tiny")
    config.data.data_dir = str(data_dir)
    config.model.image_size, config.model.volume_size = (crop, crop), VOLUME
    key = {"2d": "image", "3d": "volume"}[modality]
    return {
        _text(record_id): array
        for batch in eval_split.eval_batches(config, name, modality, split)
        for record_id, array in zip(batch["id"], batch[key], strict=True)
    }


def test_files_read_for_inference_are_the_prepared_records_eval_transformed(
    built, mimic_root, bimcv_root
):
    """transforms.{xray,volume}_from_file (inference's path) give, file by file, what the
    builders store and the eval pipeline then reads."""
    data_dir, _ = built
    xrays = _eval_rows(data_dir, "mimic_cxr_jpg", "2d", "train")
    assert sorted(xrays) == ["d01", "d05"]
    for dicom, image in xrays.items():
        row = next(r for r in MIMIC_IMAGES if r[0] == dicom)
        jpeg = mimic_root / "files" / "p10" / f"p{row[1]}" / f"s{row[2]}" / f"{dicom}.jpg"
        got = transforms.xray_from_file(jpeg, crop_size=24, stored_size=IMAGE_SIZE)
        np.testing.assert_array_equal(got, image)
    volumes = _eval_rows(data_dir, "bimcv_covid19", "3d", "train")
    assert volumes
    window = tuple(get_config("tiny").data.hu_window)
    for run, volume in volumes.items():
        (path,) = bimcv_root.glob(f"sub-*/ses-*/mod-rx/{run}.nii.gz")
        np.testing.assert_array_equal(transforms.volume_from_file(path, VOLUME, window), volume)


def test_mimic_skips_counted_by_reason(built):
    data_dir, out = built
    skipped = _metadata(data_dir, "mimic_cxr_jpg")["skipped"]
    assert skipped == {
        "train": {
            "lateral view": 2,
            "short report": 1,
            "unreadable file": 1,
            "other view": 1,
            "missing image": 1,
        },
        "validation": {},
        "test": {"missing report": 1},
        "none": {"not in split file": 1},
    }
    assert "mimic_cxr_jpg/xray (built)" in out and "kept: train 2, validation 1, test 1" in out


def test_mimic_chexpert_labels_keep_uncertain_and_missing_distinct(built):
    data_dir, _ = built
    first, no_row = _records(data_dir, "mimic_cxr_jpg", "train")
    labels = first["labels"]
    assert labels.dtype == np.float32 and labels.shape == (14,)
    np.testing.assert_array_equal(labels[:3], [1.0, -1.0, 0.0])
    assert np.isnan(labels[3:]).all()
    assert np.isnan(no_row["labels"]).all()  # study without a CheXpert row
    meta = _metadata(data_dir, "mimic_cxr_jpg")
    assert meta["labels"] == list(mimic_cxr_jpg.CHEXPERT_LABELS)
    assert meta["options"] == {"image_size": IMAGE_SIZE}


def test_worker_processes_give_the_same_records(built, mimic_root, tmp_path):
    data_dir, _ = built
    prepare.ensure_prepared(
        "mimic_cxr_jpg", tmp_path, str(mimic_root), image_size=IMAGE_SIZE, num_workers=2
    )
    for split in ("train", "test"):
        for got, want in zip(
            _records(tmp_path, "mimic_cxr_jpg", split),
            _records(data_dir, "mimic_cxr_jpg", split),
            strict=True,
        ):
            assert got.keys() == want.keys()
            for key in got:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert _metadata(tmp_path, "mimic_cxr_jpg") == _metadata(data_dir, "mimic_cxr_jpg")


def test_split_that_keeps_nothing_fails_with_the_reasons(mimic_root, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(mimic_root, root)
    (root / "files" / "p10" / "p10001122" / "s50000005.txt").write_text(SHORT_REPORT)
    with pytest.raises(ValueError, match=r"split 'test' kept none of its 2 inputs .*short report"):
        prepare.ensure_prepared(
            "mimic_cxr_jpg", tmp_path / "data", str(root), image_size=IMAGE_SIZE, **SERIAL
        )
    assert not (tmp_path / "data" / "mimic_cxr_jpg" / "xray" / "1.0.0").exists()


# ---------------------------------------------------------------------------- BIMCV tests


def _all_records(data_dir, name, splits=("train", "validation", "test")):
    return {split: _records(data_dir, name, split) for split in splits}


def test_bimcv_one_axial_ct_per_session_with_most_slices(built, bimcv_root):
    data_dir, _ = built
    records = [r for rs in _all_records(data_dir, "bimcv_covid19").values() for r in rs]
    kept = {_text(r["session_id"]): _text(r["id"]) for r in records}
    assert kept == BIMCV_KEPT
    run2 = next(r for r in records if _text(r["session_id"]) == "ses-E00001")
    path = next(bimcv_root.glob(f"sub-S00001/ses-E00001/mod-rx/{BIMCV_KEPT['ses-E00001']}*"))
    want = imaging.prepare_volume(imaging.read_nifti(path), VOLUME)
    assert run2["volume"].dtype == np.int16 and run2["volume"].shape == VOLUME
    np.testing.assert_array_equal(run2["volume"], want)
    assert run2["labels"].shape == (0,)


def test_bimcv_spanish_list_literal_parsed(built):
    data_dir, _ = built
    for records in _all_records(data_dir, "bimcv_covid19").values():
        for record in records:
            assert _text(record["report"]) == SPANISH_TEXT and record["num_sentences"] == 3


def test_bimcv_skips_and_subject_level_split(built):
    data_dir, _ = built
    meta = _metadata(data_dir, "bimcv_covid19")
    assert _skip_totals(meta) == BIMCV_SKIPPED
    subjects = {
        split: {_text(r["subject_id"]) for r in records}
        for split, records in _all_records(data_dir, "bimcv_covid19").items()
    }
    assert [len(s) for s in subjects.values()] == [3, 1, 1]
    assert set.union(*subjects.values()) == set(BIMCV_REPORTS)
    expected = common.split_groups(BIMCV_REPORTS, bimcv_covid19.HELD_OUT, seed=0)
    assert all(expected[s] == split for split, group in subjects.items() for s in group)
    assert meta["options"] == {"volume_shape": list(VOLUME), "seed": 0, "translations": None}


def test_bimcv_translations_replace_spanish(tmp_path, bimcv_root):
    english = "Bilateral ground-glass opacities. No pleural effusion. Normal heart size."
    rows = [["ses-E00001", english], ["E00003", english], ["ses-E00007", english]]
    rows += [["ses-E00008", english], ["ses-E00005", english]]
    _write_csv(tmp_path / "translations.csv", ["session_id", "text"], rows)
    prepare.ensure_prepared(
        "bimcv_covid19",
        tmp_path / "data",
        str(bimcv_root),
        volume_shape=VOLUME,
        translations=str(tmp_path / "translations.csv"),
        **SERIAL,
    )
    records = _all_records(tmp_path / "data", "bimcv_covid19")
    assert sum(len(r) for r in records.values()) == 5
    assert {_text(r["report"]) for rs in records.values() for r in rs} == {english}
    # The not-axial, zero-byte and short-report sessions have no translation.
    totals = _skip_totals(_metadata(tmp_path / "data", "bimcv_covid19"))
    assert totals == {"missing translation": 3, "missing report": 1}


def test_split_groups_is_seeded_and_disjoint():
    groups = [f"s{i}" for i in range(100)]
    a = common.split_groups(groups, {"validation": 0.05, "test": 0.05}, seed=0)
    assert a == common.split_groups(reversed(groups), {"validation": 0.05, "test": 0.05}, 0)
    assert a != common.split_groups(groups, {"validation": 0.05, "test": 0.05}, seed=1)
    counts = {s: list(a.values()).count(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 90, "validation": 5, "test": 5}


# -------------------------------------------------------------------------- CT-RATE tests


def test_ct_rate_rescale_to_known_hu(built):
    data_dir, _ = built
    records = {_text(r["id"]): r for rs in _all_records(data_dir, "ct_rate").values() for r in rs}
    for name, hu in CT_RATE_HU.items():
        assert records[name]["volume"].dtype == np.int16
        assert (records[name]["volume"] == hu).all(), name  # train_2_a_1: header scaling only
    raw = CT_RATE["train_1_a_2"][0].astype(np.float32) - 1024
    canonical = imaging.prepare_volume(imaging.Volume(raw, CT_RATE_AFFINE, "x"), VOLUME)
    np.testing.assert_array_equal(records["train_1_a_2"]["volume"], canonical)


def test_ct_rate_splits_labels_and_skips(built):
    data_dir, _ = built
    records = _all_records(data_dir, "ct_rate")
    ids = {split: [_text(r["id"]) for r in rs] for split, rs in records.items()}
    assert ids["test"] == ["valid_1_a_1", "valid_2_a_1"]
    kept_train = {n for n, v in CT_RATE.items() if v[4] == "kept" and n.startswith("train")}
    assert set(ids["train"]) | set(ids["validation"]) == kept_train
    patients = {s: {_text(r["patient_id"]) for r in rs} for s, rs in records.items()}
    assert len(patients["validation"]) == 1 and not patients["validation"] & patients["train"]
    by_id = {_text(r["id"]): r for rs in records.values() for r in rs}
    np.testing.assert_array_equal(by_id["valid_1_a_1"]["labels"], LABELS_ROW)
    assert np.isnan(by_id["train_1_a_2"]["labels"]).all()  # no labels row
    meta = _metadata(data_dir, "ct_rate")
    expected = [v[4] for v in CT_RATE.values() if v[4] != "kept"]
    assert _skip_totals(meta) == {reason: expected.count(reason) for reason in expected}
    assert meta["labels"] == list(ct_rate.ABNORMALITIES)


# ---------------------------------------------------------------------------- layout errors


@pytest.mark.parametrize(
    ("name", "remove", "message"),
    [
        ("mimic_cxr_jpg", mimic_cxr_jpg.METADATA, "mimic-cxr-2.0.0-metadata.csv.gz not found"),
        ("mimic_cxr_jpg", mimic_cxr_jpg.CHEXPERT, "mimic-cxr-2.0.0-chexpert.csv.gz not found"),
        ("ct_rate", "metadata/train_metadata.csv", "metadata/train_metadata.csv not found"),
        ("ct_rate", "dataset/valid", "dataset/valid not found"),
    ],
)
def test_incomplete_manual_dir_names_what_is_missing(
    tmp_path, mimic_root, ct_rate_root, name, remove, message
):
    source = {"mimic_cxr_jpg": mimic_root, "ct_rate": ct_rate_root}[name]
    root = tmp_path / "raw"
    shutil.copytree(source, root)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(common.LayoutError, match=message) as error:
        prepare.ensure_prepared(name, tmp_path / "data", str(root), **SERIAL)
    assert "expected" in str(error.value)
    assert not (tmp_path / "data" / name).exists()


def test_ct_rate_csv_folders_may_sit_inside_dataset(tmp_path, ct_rate_root):
    root = tmp_path / "CT-RATE"
    shutil.copytree(ct_rate_root, root)
    for folder in ("radiology_text_reports", "metadata", "multi_abnormality_labels"):
        (root / folder).rename(root / "dataset" / folder)
    assert ct_rate.check_manual_dir(root) == root
    volumes = ct_rate._volumes(root, ct_rate.PARTS["valid"], VOLUME)
    assert [v.name for v in volumes] == ["valid_1_a_1", "valid_2_a_1"]
    assert volumes[0].rescale == (1.0, -1024.0) and volumes[0].labels == tuple(LABELS_ROW)


def test_missing_or_empty_manual_dir(tmp_path):
    with pytest.raises(common.LayoutError, match="does not exist; expected the MIMIC-CXR-JPG"):
        prepare.ensure_prepared("mimic_cxr_jpg", tmp_path, str(tmp_path / "nope"), **SERIAL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.LayoutError, match="no sub-\\* subject folders"):
        prepare.ensure_prepared("bimcv_covid19", tmp_path, str(tmp_path / "empty"), **SERIAL)
    with pytest.raises(ValueError, match="--manual_dir"):
        prepare.ensure_prepared("ct_rate", tmp_path, **SERIAL)


def test_cli_reports_layout_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare.run(["ct_rate", f"--data_dir={tmp_path}", f"--manual_dir={tmp_path}"])
    assert exit_.value.code == 2
    assert "dataset/train not found in" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pipeline


class _Tokenizer:
    """Stands in for a Hugging Face tokenizer: one token per word, padded."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = np.zeros((len(texts), max_length), np.int64)
        for row, text in enumerate(texts):
            n = min(len(text.split()), max_length)
            ids[row, :n] = 1
        return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}


def test_train_stream_reads_mimic_and_bimcv(built):
    data_dir, _ = built
    c = get_config("tiny")
    c.model.image_size = (16, 16)
    c.model.volume_size = VOLUME
    c.batch.size_2d, c.batch.size_3d = 2, 2
    c.data.update(
        data_dir=str(data_dir),
        sources_2d="mimic_cxr_jpg",
        sources_3d="bimcv_covid19",
        worker_count=0,
    )
    stream = train_stream.TrainStream(c, _Tokenizer())
    batch = next(stream)
    stream.close()
    assert batch["image"].shape == (2, 16, 16) and batch["volume"].shape == (2, *VOLUME)
    words = min(len(SPANISH_TEXT.split()), c.text.max_length)
    assert batch["volume_text_mask"].sum(axis=1).tolist() == [words, words]
    assert stream.skipped == {}
    (evaluated,) = eval_split.eval_batches(c, "bimcv_covid19", "3d", "test")
    assert evaluated["labels"].shape == (1, 0)
    assert not math.isnan(float(evaluated["volume"].mean()))
