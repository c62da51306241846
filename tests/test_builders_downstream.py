"""The five evaluation builders (CheXpert, RSNA Pneumonia, COVIDx, CC-CCII, LUNA16) on tiny
fixtures laid out like the real releases: split sizes, label mapping, patient-level separation,
numeric slice order, box masks, world-to-voxel conversion and layout errors."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import imaging, prepare, sources, transforms
from data_pipelines.builders import (
    REGISTRY,
    cc_ccii,
    chexpert,
    common,
    covidx,
    luna16,
    rsna_pneumonia,
)
from tests.test_builders_real import _eval_rows, _skip_totals, _text, _write_csv
from tests.test_imaging import _write_xray

SPLITS = ("train", "validation", "test")


def _records(data_dir, name):
    """split -> the prepared records of `name`, in order."""
    return {
        split: list(sources.open_source(name, data_dir, split=split).open()) for split in SPLITS
    }


def _metadata(data_dir, name):
    spec = REGISTRY[name]
    (config,) = spec.configs
    return json.loads((data_dir / name / config / "1.0.0" / "metadata.json").read_text())


def _ids(records):
    return {split: [_text(r["id"]) for r in rs] for split, rs in records.items()}


def _patients(records):
    return {split: {_text(r["patient_id"]) for r in rs} for split, rs in records.items()}


def _assert_disjoint(patients):
    splits = list(patients)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not patients[a] & patients[b], (a, b, patients[a] & patients[b])


def _image(path, value, shape=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def _xray(path, value, shape=(20, 30)):
    """An image around grey `value` with a gradient: builders skip constant X-rays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.add.outer(np.arange(shape[0]), np.arange(shape[1])) % 16
    Image.fromarray((value + ramp).astype(np.uint8)).save(path)


# ----------------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
# Cells of Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion, and what they
# become under 'paper', 'ones' and 'zeros'.
UNCERTAIN = (("-1.0", "-1.0", "", "-1.0", "-1.0"), [1, 0, 0, 1, 1], [1, 1, 0, 1, 1], [0] * 5)
CERTAIN = (("1.0", "0.0", "1.0", "", "0.0"), [1, 0, 1, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 0, 0])
# split, patient, frontal views, lateral views, cells
CHEXPERT_STUDIES = [
    ("train", "patient00001", 2, 1, UNCERTAIN),
    ("train", "patient00002", 1, 0, CERTAIN),
    ("train", "patient00003", 3, 0, UNCERTAIN),
    ("train", "patient00004", 1, 0, CERTAIN),  # its image is not on disk
    ("train", "patient00005", 1, 1, CERTAIN),
    ("train", "patient00006", 2, 0, UNCERTAIN),
    ("valid", "patient64541", 1, 1, CERTAIN),
    ("valid", "patient64542", 1, 0, CERTAIN),
]
CHEXPERT_VALIDATION = 3


def _chexpert_rows(split):
    rows = []
    for study_split, patient, frontal, lateral, (cells, *_) in CHEXPERT_STUDIES:
        if study_split != split:
            continue
        for view in range(frontal + lateral):
            side = "Frontal" if view < frontal else "Lateral"
            path = f"CheXpert-v1.0-small/{split}/{patient}/study1/view{view + 1}_{side.lower()}.jpg"
            labels = dict(zip(chexpert.CLASS_NAMES, cells, strict=True))
            rows.append(
                [path, "Female", 68, side, "AP" if side == "Frontal" else ""]
                + [labels.get(name, "") for name in CHEXPERT_HEADER[5:]]
            )
    return rows


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    for split in ("train", "valid"):
        rows = _chexpert_rows(split)
        _write_csv(root / f"{split}.csv", CHEXPERT_HEADER, rows)
        for i, row in enumerate(rows):
            if "patient00004" not in row[0]:
                _xray(root.parent / row[0], 10 * i)
    return root


# -------------------------------------------------------------------------------------- RSNA

RSNA_COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]
RSNA_BOXES = {  # patient -> boxes (x, y, width, height); the others are negatives
    "0004cfab-14fd": [(8.0, 16.0, 16.0, 8.0), (40.0, 40.0, 8.0, 16.0)],
    "00313ee0-9eaa": [(8.0, 16.0, 16.0, 8.0)],  # a 32 x 64 image: letterboxed with a margin
}
RSNA_NEGATIVES = [f"{i:04x}0000-neg{i}" for i in range(7)]
RSNA_MISSING = "ffff0000-nodicom"
RSNA_SIZE = 32


def _rsna_rows():
    rows = [[p, *box, 1] for p, boxes in RSNA_BOXES.items() for box in boxes]
    return rows + [[p, "", "", "", "", 0] for p in [*RSNA_NEGATIVES, RSNA_MISSING]]


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna-pneumonia")
    _write_csv(root / rsna_pneumonia.LABELS, RSNA_COLUMNS, _rsna_rows())
    images = root / rsna_pneumonia.IMAGES
    images.mkdir()
    rng = np.random.default_rng(0)
    for patient in [*RSNA_BOXES, *RSNA_NEGATIVES]:
        shape = (32, 64) if patient == "00313ee0-9eaa" else (64, 64)
        _write_xray(images / f"{patient}.dcm", rng.integers(0, 4000, shape))
    return root


# ------------------------------------------------------------------------------------ COVIDx

# patient, file, label, source; one line per image
COVIDX_TRAIN = [
    ("1", "covid-1a.png", "COVID-19", "cohen"),
    ("1", "covid-1b.png", "COVID-19", "cohen"),
    ("2", "pneu-2.png", "pneumonia", "cohen"),
    ("ANON3", "CR.1.2.840.3.png", "COVID-19", "actmed"),
    ("4a-rsna", "4a-rsna.png", "normal", "rsna"),
    ("5b-rsna", "5b-rsna.png", "pneumonia", "rsna"),
    ("6", "COVID-19(6).png", "COVID-19", "sirm"),
    ("7c-rsna", "7c-rsna.png", "normal", "rsna"),
    ("8d-rsna", "8d-rsna.png", "normal", "rsna"),
    ("9e-rsna", "9e-rsna.png", "pneumonia", "rsna"),
    ("10", "normal-10.png", "normal", "cohen"),
    ("10", "missing.png", "normal", "cohen"),  # not on disk
]
COVIDX_TEST = [
    ("t1", "t1.png", "COVID-19", "ricord"),
    ("t2", "t2.png", "normal", "rsna"),
    ("t3", "t3.png", "pneumonia", "rsna"),
]


def _split_file(path, lines):
    path.write_text("".join(" ".join(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def covidx_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("covidx")
    for split, lines in (("train", COVIDX_TRAIN), ("test", COVIDX_TEST)):
        _split_file(root / f"{split}.txt", lines)
        for i, (_, name, _, _) in enumerate(lines):
            if name != "missing.png":
                _xray(root / split / name, 20 * i, (24, 20))
    return root


# ----------------------------------------------------------------------------------- CC-CCII

CC_SHAPE = (4, 8, 8)
# class/patient/scan -> {slice file: grey value}; patient 100 has an NCP and a CP scan
CC_SCANS = {
    "NCP/100/1001": {"1.png": 10, "2.png": 20, "3.png": 30, "10.png": 100},
    "NCP/101/1002": {f"{n:04d}.jpg": 40 * n for n in range(1, 5)},
    "CP/100/2001": {f"IM-{n}.png": 50 + n for n in (9, 10, 11, 12)},
    "CP/102/2002": {f"{n}.png": 60 for n in range(4)},
    "CP/103/2003": {"a.png": 1, "b.png": 2},  # unnumbered slice
    "CP/103/2004": {f"{n}.png": 65 for n in range(5)},
    "Normal/104/3001": {f"{n}.png": 70 for n in range(6)},
    "Normal/105/3002": {f"{n}.png": 80 for n in range(3)},
    "Normal/106/3003": {"0.png": 90, "1.png": 90},  # slices of two sizes
    "Normal/106/3004": {"0.png": 95, "1.png": 95},
}
CC_KEPT = sorted(set(CC_SCANS) - {"CP/103/2003", "Normal/106/3003"})


@pytest.fixture(scope="module")
def cc_ccii_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("Clean-CC-CCII")
    for scan, slices in CC_SCANS.items():
        for i, (name, value) in enumerate(slices.items()):
            shape = (20, 16) if scan == "Normal/106/3003" and i else (16, 16)
            _image(root / scan / name, value, shape)
    return root


# ------------------------------------------------------------------------------------ LUNA16

LUNA_ARRAY = (16, 64, 64)  # z, y, x
SPACING = (0.5, 0.8, 2.0)  # x, y, z mm
IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
FLIP_XY = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
LUNA_SHAPE, LUNA_CROP = (8, 16, 16), (16, 16, 16)
# seriesuid -> subset, TransformMatrix, Offset, nodule voxel (z, y, x) of the array
LUNA_SERIES = {
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.100": (0, IDENTITY, (-16.0, -25.6, -300.0), (8, 32, 32)),
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.200": (0, FLIP_XY, (120.0, 60.0, -310.0), (6, 20, 44)),
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.300": (1, IDENTITY, (-150.0, -170.0, -250.0), (9, 40, 24)),
    "1.3.6.1.4.1.14519.5.2.1.6279.6001.400": (2, IDENTITY, (-150.0, -170.0, -250.0), (7, 28, 36)),
}
LUNA_MISSING = "1.3.6.1.4.1.14519.5.2.1.6279.6001.999"  # in candidates.csv, no .mhd
NODULE_HU, AIR_HU = 400, int(luna16.PAD_HU)  # air, as crops are padded outside the scan


def _mhd(path, voxels, offset, matrix=IDENTITY, spacing=SPACING):
    """A .mhd/.raw pair written as LUNA16 ships them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = voxels.shape
    words = lambda values: " ".join(str(v) for v in values)
    path.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"CompressedData = False\nTransformMatrix = {words(matrix)}\nOffset = {words(offset)}\n"
        "CenterOfRotation = 0 0 0\nAnatomicalOrientation = RAI\n"
        f"ElementSpacing = {words(spacing)}\nDimSize = {nx} {ny} {nz}\n"
        f"ElementType = MET_SHORT\nElementDataFile = {path.stem}.raw\n"
    )
    path.with_suffix(".raw").write_bytes(voxels.astype("<i2").tobytes())


def _nodule_volume(zyx):
    voxels = np.full(LUNA_ARRAY, AIR_HU, np.int16)
    z, y, x = zyx
    voxels[z - 1 : z + 2, y - 4 : y + 5, x - 6 : x + 7] = NODULE_HU
    return voxels


def _world(matrix, offset, zyx):
    """By hand: ITK world (x, y, z) of voxel index (z, y, x), axis-aligned directions only."""
    signs = np.diag(np.reshape(matrix, (3, 3)))
    terms = zip(offset, signs, SPACING, zyx[::-1], strict=True)
    return tuple(float(o + s * d * i) for o, s, d, i in terms)


@pytest.fixture(scope="module")
def luna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("luna16")
    candidates, annotations = [], []
    for uid, (subset, matrix, offset, nodule) in LUNA_SERIES.items():
        _mhd(root / f"subset{subset}" / f"{uid}.mhd", _nodule_volume(nodule), offset, matrix)
        world = _world(matrix, offset, nodule)
        annotations.append([uid, world[0] + 1.0, *world[1:], 6.0])  # 1 mm off: still inside
        candidates.append([uid, *world, 1])
        for far in ((3, 8, 8), (12, 56, 10), (4, 52, 56)):  # more than 16 mm from the nodule
            candidates.append([uid, *_world(matrix, offset, far), 0])
    candidates.append([LUNA_MISSING, 0.0, 0.0, 0.0, 1])
    _write_csv(root / "annotations.csv", ["seriesuid", *luna16.WORLD, "diameter_mm"], annotations)
    _write_csv(root / "candidates.csv", ["seriesuid", *luna16.WORLD, "class"], candidates)
    return root


# ------------------------------------------------------------------------------------ builds


@pytest.fixture(scope="module")
def built(tmp_path_factory, chexpert_root, rsna_root, covidx_root, cc_ccii_root, luna_root):
    """All five built through the CLI into one data_dir; returns (data_dir, stdout)."""
    data_dir = tmp_path_factory.mktemp("data")
    shape = lambda values: ",".join(map(str, values))
    builds = {
        "chexpert": (chexpert_root, ["--image_size=16", f"--num_validation={CHEXPERT_VALIDATION}"]),
        "rsna_pneumonia": (rsna_root, [f"--image_size={RSNA_SIZE}"]),
        "covidx": (covidx_root, ["--image_size=16"]),
        "cc_ccii": (cc_ccii_root, [f"--volume_shape={shape(CC_SHAPE)}"]),
        "luna16": (
            luna_root,
            [
                f"--volume_shape={shape(LUNA_SHAPE)}",
                f"--crop_mm={shape(LUNA_CROP)}",
                "--validation_subsets=1",
                "--test_subsets=2",
            ],
        ),
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for name, (root, extra) in builds.items():
            argv = [name, f"--data_dir={data_dir}", f"--manual_dir={root}", "--num_workers=0"]
            assert prepare.run(argv + extra) == 0
    return data_dir, out.getvalue()


def test_task_constants_label_features_and_metadata(built):
    data_dir, out = built
    for name in ("chexpert", "rsna_pneumonia", "covidx", "cc_ccii", "luna16"):
        module = REGISTRY[name].load()
        assert module.TASK in common.TASKS
        meta = _metadata(data_dir, name)
        assert meta["task"] == module.TASK and meta["classes"] == list(module.CLASS_NAMES)
        labels = np.stack([r["labels" if module.TASK == "multilabel" else "label"]
                           for rs in _records(data_dir, name).values() for r in rs])  # fmt: skip
        if module.TASK == "multilabel":  # what the linear probe takes: [N, C] 0/1, [N] int
            assert labels.dtype == np.float32 and labels.shape[1] == len(module.CLASS_NAMES)
            assert np.isin(labels, (0, 1)).all()
        else:
            assert labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
            assert set(labels.tolist()) == set(range(len(module.CLASS_NAMES)))
        assert f"{name}/{REGISTRY[name].configs[0]} (built)" in out


# ----------------------------------------------------------------------------- CheXpert tests


def test_chexpert_frontal_only_with_patient_held_out_validation(built, chexpert_root):
    data_dir, _ = built
    records = _records(data_dir, "chexpert")
    patients = _patients(records)
    _assert_disjoint(patients)
    assert patients["test"] == {"patient64541", "patient64542"}
    # Validation: the shortest prefix of the seeded patient order holding >= 3 frontal images.
    frontal = {p: f for s, p, f, _, _ in CHEXPERT_STUDIES if s == "train"}
    order = common.seeded_order(frontal, seed=0)
    held = [frontal[p] for p in order]
    k = next(i for i in range(1, len(order) + 1) if sum(held[:i]) >= CHEXPERT_VALIDATION)
    assert patients["validation"] == set(order[:k]) - {"patient00004"}
    assert patients["train"] == set(order[k:]) - {"patient00004"}
    assert all("frontal" in i for ids in _ids(records).values() for i in ids)
    meta = _metadata(data_dir, "chexpert")
    assert _skip_totals(meta) == {"lateral view": 3, "missing image": 1}
    assert meta["options"] == {
        "image_size": 16, "uncertain": "paper", "num_validation": 3, "seed": 0
    }  # fmt: skip
    record = records["test"][0]
    cell = _text(record["id"])
    assert cell == "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    want = imaging.letterbox(imaging.read_image_2d(chexpert_root.parent / cell), 16)
    np.testing.assert_array_equal(record["image"], want)
    assert _text(record["view"]) == "AP" and _text(record["study_id"]) == "study1"


def test_chexpert_uncertain_policies_and_blanks(built, chexpert_root):
    data_dir, _ = built
    by_patient = {
        _text(r["patient_id"]): r["labels"]
        for rs in _records(data_dir, "chexpert").values()
        for r in rs
    }
    for _, patient, _, _, (_, paper, _, _) in CHEXPERT_STUDIES:
        if patient in by_patient:
            np.testing.assert_array_equal(by_patient[patient], paper, err_msg=patient)
    for policy, column in (("paper", 1), ("ones", 2), ("zeros", 3)):
        images = chexpert._images(chexpert_root, "train.csv", chexpert.uncertain_values(policy), 8)
        first = images[0]  # patient00001: the uncertain row
        assert first.labels == tuple(UNCERTAIN[column]), policy
    custom = chexpert.uncertain_values("Cardiomegaly=1, Edema=0")
    assert custom == (1.0, 1.0, 0.0, 0.0, 1.0)


def test_chexpert_bad_cells_and_options_are_named(tmp_path, chexpert_root):
    with pytest.raises(ValueError, match="bad uncertain option 'Edema=2'"):
        chexpert.make_builder("xray", str(tmp_path), uncertain="Edema=2")
    with pytest.raises(ValueError, match="num_validation=10 must be at least 1 and below 10"):
        prepare.ensure_prepared(
            "chexpert", tmp_path / "data", str(chexpert_root), num_validation=10, num_workers=0
        )
    root = tmp_path / "raw"
    shutil.copytree(chexpert_root, root)
    rows = _chexpert_rows("valid")
    rows[1][CHEXPERT_HEADER.index("Edema")] = "2.0"
    _write_csv(root / "valid.csv", CHEXPERT_HEADER, rows)
    with pytest.raises(common.LayoutError, match=r"valid\.csv line 3, column Edema: '2\.0'"):
        chexpert._images(root, "valid.csv", chexpert.uncertain_values("paper"), 8)


# --------------------------------------------------------------------------------- RSNA tests


def test_rsna_splits_labels_and_skips(built):
    data_dir, _ = built
    records = _records(data_dir, "rsna_pneumonia")
    patients = _patients(records)
    _assert_disjoint(patients)
    everyone = [*RSNA_BOXES, *RSNA_NEGATIVES, RSNA_MISSING]
    expected = common.split_groups(everyone, rsna_pneumonia.HELD_OUT, seed=0)
    assert [list(expected.values()).count(s) for s in SPLITS] == [6, 2, 2]  # 70/15/15 of 10
    for split in SPLITS:
        assert patients[split] == {p for p, s in expected.items() if s == split} - {RSNA_MISSING}
    assert _skip_totals(_metadata(data_dir, "rsna_pneumonia")) == {"missing image": 1}
    for record in (r for rs in records.values() for r in rs):
        patient = _text(record["patient_id"])
        assert record["label"] == (patient in RSNA_BOXES)
        assert record["num_boxes"] == len(RSNA_BOXES.get(patient, []))
        assert record["mask"].any() == (patient in RSNA_BOXES)


def test_rsna_box_mask_follows_the_letterbox(built, rsna_root):
    data_dir, _ = built
    by_id = {_text(r["id"]): r for rs in _records(data_dir, "rsna_pneumonia").values() for r in rs}
    # 64 x 64 -> 32 x 32: every coordinate halves.
    want = np.zeros((RSNA_SIZE, RSNA_SIZE), np.uint8)
    want[8:12, 4:12] = 1  # y 16..24, x 8..24
    want[20:28, 20:24] = 1  # y 40..56, x 40..48
    np.testing.assert_array_equal(by_id["0004cfab-14fd"]["mask"], want)
    # 32 rows x 64 columns -> 16 x 32, centred: 8 rows of padding above.
    record = by_id["00313ee0-9eaa"]
    want = np.zeros((RSNA_SIZE, RSNA_SIZE), np.uint8)
    want[16:20, 4:12] = 1
    np.testing.assert_array_equal(record["mask"], want)
    image = imaging.read_image_2d(rsna_root / rsna_pneumonia.IMAGES / "00313ee0-9eaa.dcm")
    np.testing.assert_array_equal(record["image"], imaging.letterbox(image, RSNA_SIZE))
    assert not record["image"][:8].any() and record["image"][8:24].any()


def test_dicom_xray_read_for_inference_is_the_prepared_record_eval_transformed(built, rsna_root):
    """transforms.xray_from_file (inference's path) gives, DICOM by DICOM, what the RSNA builder
    stores and the eval pipeline then reads (letterbox padding included)."""
    data_dir, _ = built
    rows = _eval_rows(data_dir, "rsna_pneumonia", "2d", "train", crop=24)
    assert "00313ee0-9eaa" in rows or len(rows) > 1
    for patient, image in rows.items():
        dicom = rsna_root / rsna_pneumonia.IMAGES / f"{patient}.dcm"
        got = transforms.xray_from_file(dicom, crop_size=24, stored_size=RSNA_SIZE)
        np.testing.assert_array_equal(got, image)


def test_rsna_inconsistent_rows_are_named(tmp_path, rsna_root):
    root = tmp_path / "raw"
    shutil.copytree(rsna_root, root)
    rows = _rsna_rows()
    rows[3] = [rows[3][0], "", "", "", "", 1]
    _write_csv(root / rsna_pneumonia.LABELS, RSNA_COLUMNS, rows)
    with pytest.raises(common.LayoutError, match="line 5: Target '1' with x, y, width, height"):
        rsna_pneumonia._patients(root, 8)
    rows = [*_rsna_rows(), ["0004cfab-14fd", "", "", "", "", 0]]
    _write_csv(root / rsna_pneumonia.LABELS, RSNA_COLUMNS, rows)
    with pytest.raises(common.LayoutError, match="patient 0004cfab-14fd has rows with Target 0"):
        rsna_pneumonia._patients(root, 8)


# ------------------------------------------------------------------------------- COVIDx tests


def test_covidx_official_test_and_patient_validation(built, covidx_root):
    data_dir, _ = built
    records = _records(data_dir, "covidx")
    assert _ids(records)["test"] == ["t1.png", "t2.png", "t3.png"]
    assert [r["label"] for r in records["test"]] == [2, 0, 1]
    patients = _patients(records)
    _assert_disjoint({s: p for s, p in patients.items() if s != "test"})
    train_patients = {line[0] for line in COVIDX_TRAIN}
    expected = common.split_groups(train_patients, covidx.HELD_OUT, seed=0)
    assert list(expected.values()).count("validation") == 1  # 10% of 10 patients
    for split in ("train", "validation"):
        assert patients[split] == {p for p, s in expected.items() if s == split}
    index = {name: i for i, name in enumerate(covidx.CLASS_NAMES)}
    for record in records["train"] + records["validation"]:
        line = next(line for line in COVIDX_TRAIN if line[1] == _text(record["id"]))
        assert record["label"] == index[line[2]] and _text(record["source"]) == line[3]
    assert _skip_totals(_metadata(data_dir, "covidx")) == {"missing image": 1}


def test_covidx_binary_release_fails_clearly(tmp_path):
    lines = [("1", "a.png", "positive", "cohen"), ("2", "b.png", "negative", "rsna")]
    _split_file(tmp_path / "train.txt", lines)
    with pytest.raises(common.LayoutError, match=r"train\.txt line 1: label 'positive'.*binary"):
        covidx.read_split_file(tmp_path / "train.txt", tmp_path, 8)
    _split_file(tmp_path / "train.txt", [("1", "a.png", "COVID", "cohen")])
    with pytest.raises(common.LayoutError, match="label 'COVID' is not one of"):
        covidx.read_split_file(tmp_path / "train.txt", tmp_path, 8)
    _split_file(tmp_path / "train.txt", [("1", "a.png")])
    with pytest.raises(common.LayoutError, match="is not 'patient_id filename label source'"):
        covidx.read_split_file(tmp_path / "train.txt", tmp_path, 8)


# ------------------------------------------------------------------------------ CC-CCII tests


def test_cc_ccii_slices_stack_in_numeric_order_as_grey_levels(built):
    data_dir, _ = built
    records = {_text(r["id"]): r for rs in _records(data_dir, "cc_ccii").values() for r in rs}
    assert sorted(records) == CC_KEPT
    first = records["NCP/100/1001"]
    assert first["volume"].dtype == np.int16 and first["volume"].shape == CC_SHAPE
    grey = np.array([10, 20, 30, 100])  # 1, 2, 3, 10.png: not 1, 10, 2, 3
    np.testing.assert_array_equal(
        first["volume"][:, 0, 0], cc_ccii.gray_to_stored(grey, (-1000, 1000))
    )
    assert (first["volume"] == first["volume"][:, :1, :1]).all()
    # The pre-training window maps the stored values back to grey / 255.
    unit = transforms.transform_3d(first["volume"], (-1000.0, 1000.0))
    np.testing.assert_allclose(unit[:, 0, 0], grey / 255, atol=1e-3)
    assert first["num_slices"] == 4 and first["label"] == 0
    for scan, record in records.items():
        values = np.array(list(CC_SCANS[scan].values()), np.float32)
        order = np.argsort([cc_ccii.slice_number(n) for n in CC_SCANS[scan]])
        stack = imaging.resize_volume(values[order][:, None, None], (CC_SHAPE[0], 1, 1))
        np.testing.assert_allclose(
            transforms.transform_3d(record["volume"])[:, 0, 0], stack[:, 0, 0] / 255, atol=5e-3
        )  # within a grey level (the JPEG slices)
        assert record["label"] == cc_ccii.CLASS_NAMES.index(scan.split("/")[0])


def test_cc_ccii_patient_split_and_skips(built):
    data_dir, _ = built
    records = _records(data_dir, "cc_ccii")
    patients = _patients(records)
    _assert_disjoint(patients)
    assert [len(patients[s]) for s in SPLITS] == [5, 1, 1]  # 70/15/15 of 7 patients
    split_of = {_text(r["id"]): s for s, rs in records.items() for r in rs}
    assert split_of["NCP/100/1001"] == split_of["CP/100/2001"]  # one patient, two classes
    meta = _metadata(data_dir, "cc_ccii")
    assert _skip_totals(meta) == {"unnumbered slice": 1, "inconsistent series": 1}
    assert meta["options"]["gray_window"] == [-1000, 1000]


def test_slice_number_is_the_last_number_of_the_stem():
    names = ["10.png", "2.png", "0001.png", "IM-0001-0003.jpg", "slice_12.jpeg"]
    assert [cc_ccii.slice_number(n) for n in names] == [10, 2, 1, 3, 12]
    assert cc_ccii.slice_number("mask.png") is None
    with pytest.raises(ValueError, match="gray_window"):
        cc_ccii.make_builder("ct", "/tmp", gray_window=(10, 10))


# ------------------------------------------------------------------------------- LUNA16 tests


@pytest.mark.parametrize(
    ("matrix", "offset", "world"),
    [
        (IDENTITY, (-100.0, -50.0, -300.0), (-90.0, -42.0, -290.0)),
        (FLIP_XY, (100.0, 50.0, -300.0), (90.0, 42.0, -290.0)),
        ((1, 0, 0, 0, 1, 0, 0, 0, -1), (-100.0, -50.0, -280.0), (-90.0, -42.0, -290.0)),
    ],
)
def test_world_to_voxel_by_hand(tmp_path, matrix, offset, world):
    # x: (-90 - -100) / 0.5 = 20; y: (-42 - -50) / 0.8 = 10; z: (-290 - -300) / 2 = 5, with
    # the sign of each flipped axis reversing its difference.
    _mhd(tmp_path / "s.mhd", np.zeros((2, 2, 2), np.int16), offset, matrix)
    header = luna16.read_meta_header(tmp_path / "s.mhd")
    np.testing.assert_allclose(header.world_to_voxel(world), [5.0, 10.0, 20.0])
    np.testing.assert_allclose(header.world_to_voxel([world, world]), [[5.0, 10.0, 20.0]] * 2)


def test_flipped_axes_give_the_same_crop(tmp_path):
    """One anatomy stored with x, y running right/anterior and left/posterior."""
    anatomy = _nodule_volume((8, 32, 32))
    anatomy[7:10, 30:35, 44:48] = 100  # a marker 6 mm toward patient left (+x) of the nodule
    offset = (-16.0, -25.6, -300.0)
    flipped_offset = (offset[0] + SPACING[0] * 63, offset[1] + SPACING[1] * 63, offset[2])
    _mhd(tmp_path / "a.mhd", anatomy, offset)
    _mhd(tmp_path / "b.mhd", anatomy[:, ::-1, ::-1], flipped_offset, FLIP_XY)
    world = _world(IDENTITY, offset, (8, 32, 32))
    assert _world(FLIP_XY, flipped_offset, (8, 31, 31)) == pytest.approx(world)
    volumes = [
        imaging.canonicalize(luna16.read_metaimage(tmp_path / f)) for f in ("a.mhd", "b.mhd")
    ]
    crops = [luna16.crop(volume, world, (8, 16, 24), (4, 16, 16)) for volume in volumes]
    np.testing.assert_array_equal(*crops)
    crop = crops[0]
    assert crop[2, 8, 8] == NODULE_HU and crop[0, 0, 0] == AIR_HU
    assert crop[2, 8, 12:].max() > AIR_HU and crop[2, 8, :4].max() == AIR_HU  # left is +x
    assert luna16.crop(volumes[0], (500.0, 0.0, 0.0), (8, 16, 24), (4, 16, 16)) is None


def test_luna16_crops_labels_sampling_and_subset_split(built):
    data_dir, _ = built
    records = _records(data_dir, "luna16")
    subsets = {"train": {0}, "validation": {1}, "test": {2}}
    for split, rs in records.items():
        assert {int(r["subset"]) for r in rs} == subsets[split]
        assert sorted(int(r["label"]) for r in rs) == [0] * (len(rs) // 2) + [1] * (len(rs) // 2)
    assert [len(records[s]) for s in SPLITS] == [4, 2, 2]  # one negative per nodule
    _assert_disjoint(_patients(records))
    for record in (r for rs in records.values() for r in rs):
        volume = record["volume"]
        assert volume.dtype == np.int16 and volume.shape == LUNA_SHAPE
        centre = volume[3:5, 7:9, 7:9]
        if record["label"]:
            assert (centre == NODULE_HU).all() and volume[0, 0, 0] == AIR_HU
            assert record["diameter_mm"] == 6.0
        else:
            assert (volume == AIR_HU).all() and record["diameter_mm"] == 0.0
        uid, row = _text(record["id"]).split(":")  # each scan: its nodule row, then 3 others
        assert _text(record["patient_id"]) == uid and (int(row) % 4 == 0) == bool(record["label"])
    meta = _metadata(data_dir, "luna16")
    assert meta["candidates"]["train"] == {"nodule": 2, "non-nodule": 6, "non-nodule kept": 2}
    assert meta["skipped"]["none"] == {"missing volume": 1}
    assert meta["options"]["crop_mm"] == list(LUNA_CROP)


def test_luna16_options_are_checked(tmp_path, luna_root):
    with pytest.raises(ValueError, match="overlap"):
        luna16.make_builder("ct", str(tmp_path), validation_subsets=(1,), test_subsets=(1, 2))
    with pytest.raises(
        common.LayoutError, match=r"no nodule candidates in split 'test'.*\[0, 1, 2\]"
    ):
        prepare.ensure_prepared(
            "luna16",
            tmp_path / "data",
            str(luna_root),
            validation_subsets=(1,),
            test_subsets=(7,),
            num_workers=0,
        )


# -------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize(
    ("name", "remove", "message"),
    [
        ("chexpert", "valid.csv", "valid.csv not found"),
        ("rsna_pneumonia", rsna_pneumonia.LABELS, "stage_2_train_labels.csv not found"),
        ("covidx", "train.txt", "train.txt not found"),
        ("cc_ccii", "CP", "CP not found"),
        ("luna16", "annotations.csv", "annotations.csv not found"),
        ("luna16", "candidates.csv", "candidates.csv not found"),
    ],
)
def test_missing_file_is_a_named_layout_error(tmp_path, request, name, remove, message):
    source = request.getfixturevalue(
        {"chexpert": "chexpert_root", "rsna_pneumonia": "rsna_root", "covidx": "covidx_root",
         "cc_ccii": "cc_ccii_root", "luna16": "luna_root"}[name]
    )  # fmt: skip
    root = tmp_path / "raw"
    shutil.copytree(source, root)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(common.LayoutError, match=message) as error:
        prepare.ensure_prepared(name, tmp_path / "data", str(root), num_workers=0)
    assert "expected" in str(error.value)


def test_worker_processes_give_the_same_records(built, luna_root, tmp_path):
    data_dir, _ = built
    options = dict(
        volume_shape=LUNA_SHAPE, crop_mm=LUNA_CROP, validation_subsets=(1,), test_subsets=(2,)
    )
    prepare.ensure_prepared("luna16", tmp_path, str(luna_root), **options, num_workers=2)
    (again,) = prepare.ensure_prepared("luna16", tmp_path, str(luna_root), **options)
    assert not again.built  # the recorded options match the ones asked for
    for split, want in _records(data_dir, "luna16").items():
        got = list(sources.open_source("luna16", tmp_path, split=split).open())
        assert [_text(r["id"]) for r in got] == [_text(r["id"]) for r in want]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a["volume"], b["volume"])
