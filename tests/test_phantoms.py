"""Procedural phantoms: determinism, value ranges, ground truth that matches the pixels, reports
that match the labels."""

import dataclasses
import re

import numpy as np
import pytest

from data_pipelines import synthetic_phantoms as P

DEMO = P.PhantomConfig(image_size=64, volume_shape=(16, 64, 64))
SMALL_CT = (16, 32, 32)  # enough for report tests, where only the text matters

MENTION = {
    "pleural_effusion_left": r"effusion|costophrenic",
    "pleural_effusion_right": r"effusion|costophrenic",
    "nodule": r"nodul",
    "consolidation": r"consolidation",
    "ground_glass_opacity": r"ground-glass",
    "cardiomegaly": r"cardiomegaly|heart|cardiac",
}
SIDE = {"pleural_effusion_left": "left", "pleural_effusion_right": "right"}
NEGATION = re.compile(
    r"\b(no|not|without|normal|clear|sharp|unremarkable|intact|patent)\b", re.IGNORECASE
)
NORMAL_IMPRESSION = re.compile(
    r"no acute (cardiopulmonary|intrathoracic)|normal chest|normal ct", re.IGNORECASE
)


def _sentences(report: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", report.strip()) if s]


def _mentions(sentence: str, name: str, *, unsided_counts: bool) -> bool:
    """Whether a sentence speaks about a finding; a sentence without any side word speaks about
    both sides when `unsided_counts` (as "No pleural effusion." does)."""
    if not re.search(MENTION[name], sentence, re.IGNORECASE):
        return False
    if name not in SIDE:
        return True
    words = set(re.findall(r"[a-z]+", sentence.lower()))
    return SIDE[name] in words or (unsided_counts and not words & {"left", "right"})


def _find(modality: str, predicate, cfg: P.PhantomConfig = DEMO, start: int = 0) -> int:
    for i in range(start, start + 3000):
        if predicate(P.sample_case(i, cfg, modality)):
            return i
    raise AssertionError("no matching case in 3000 indices")


def _only(name: str):
    return lambda case: [f.name for f in case.findings] == [name]


def _normal(case: P.Case) -> P.Case:
    return dataclasses.replace(case, findings=())


def test_vocabulary_order_is_stable():
    assert P.FINDINGS == (
        "pleural_effusion_left",
        "pleural_effusion_right",
        "nodule",
        "consolidation",
        "ground_glass_opacity",
        "cardiomegaly",
    )
    assert len(P.LOBES) == 5


def test_samples_are_deterministic_and_order_independent():
    a = P.make_xray(7, DEMO)
    P.make_xray(3, DEMO)
    b = P.make_xray(7, DEMO)
    assert np.array_equal(a["image"], b["image"]) and a["report"] == b["report"]
    c = P.make_ct(7, DEMO)
    P.make_ct(2, DEMO)
    d = P.make_ct(7, DEMO)
    assert np.array_equal(c["volume"], d["volume"]) and c["report"] == d["report"]
    assert np.array_equal(c["lesion_slices"], d["lesion_slices"])


def test_index_seed_and_split_change_the_sample():
    base = P.make_ct(7, DEMO)["volume"]
    assert not np.array_equal(base, P.make_ct(8, DEMO)["volume"])
    assert not np.array_equal(base, P.make_ct(7, dataclasses.replace(DEMO, seed=1))["volume"])
    assert not np.array_equal(base, P.make_ct(7, dataclasses.replace(DEMO, split="val"))["volume"])
    image = P.make_xray(7, DEMO)["image"]
    assert not np.array_equal(image, P.make_xray(8, DEMO)["image"])


def test_bad_arguments_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="normal_fraction"):
        P.PhantomConfig(normal_fraction=1.5)
    with pytest.raises(ValueError, match="modality"):
        P.sample_case(0, DEMO, "mri")
    with pytest.raises(ValueError, match=r"lesions must be one of \('lobar', 'small'\), got 'big'"):
        P.PhantomConfig(lesions="big")


def test_xray_shape_dtype_and_contrast():
    s = P.make_xray(0, DEMO)
    img = s["image"]
    assert img.shape == (64, 64) and img.dtype == np.uint8
    assert s["labels"].dtype == np.float32 and s["labels"].shape == (len(P.FINDINGS),)
    assert img[:, :2].mean() < 40 and img[:, -2:].mean() < 40  # air beside the torso
    # Lungs are darker than the mediastinum and the abdomen on the same image.
    lung = img[20:36, 10:20].mean()
    assert lung + 40 < img[20:36, 30:34].mean() and lung + 40 < img[56:60, 25:40].mean()


def test_ct_shape_dtype_and_hounsfield_ranges():
    s = P.make_ct(0, DEMO)
    vol = s["volume"]
    assert vol.shape == (16, 64, 64) and vol.dtype == np.int16
    assert s["lesion_slices"].shape == (16,) and s["lesion_slices"].dtype == bool
    assert np.abs(vol[:, :3, :3].astype(float).mean() + 1000) < 30  # air outside the body
    mid = vol[8].astype(float)
    assert (mid < -600).mean() > 0.1  # aerated lung
    assert np.percentile(mid, 99.5) > 300  # bone
    assert -100 < np.median(vol[0, 24:40, 24:40]) < 100  # upper abdomen: soft tissue


def test_labels_and_findings_agree():
    for i in range(50):
        s = P.make_xray(i, DEMO)
        expected = np.isin(P.FINDINGS, s["findings"]).astype(np.float32)
        assert np.array_equal(s["labels"], expected)
        assert len(s["findings"]) <= DEMO.max_findings


def test_normal_fraction_is_respected():
    all_normal = dataclasses.replace(DEMO, normal_fraction=1.0)
    none_normal = dataclasses.replace(DEMO, normal_fraction=0.0)
    assert all(not P.sample_case(i, all_normal, "ct").findings for i in range(50))
    assert all(1 <= len(P.sample_case(i, none_normal, "ct").findings) <= 2 for i in range(50))
    rate = np.mean([not P.sample_case(i, DEMO, "xray").findings for i in range(400)])
    assert 0.22 < rate < 0.38


@pytest.mark.parametrize("shape", [(16, 64, 64), (32, 128, 128)])
def test_lesion_slices_are_exactly_the_slices_that_change(shape):
    cfg = dataclasses.replace(DEMO, volume_shape=shape)
    checked = 0
    for i in range(12):
        case = P.sample_case(i, cfg, "ct")
        sample = P.make_ct(i, cfg)
        healthy, _ = P.render_ct(_normal(case), shape)
        changed = (sample["volume"] != healthy).any(axis=(1, 2))
        assert np.array_equal(changed, sample["lesion_slices"])
        if case.findings:
            assert 0 < sample["lesion_slices"].sum() < shape[0]
            checked += 1
        else:
            assert not sample["lesion_slices"].any()
    assert checked >= 5


@pytest.mark.parametrize("name", P.FINDINGS)
def test_every_finding_renders_denser_tissue_in_a_strict_subset_of_slices(name):
    i = _find("ct", _only(name))
    case = P.sample_case(i, DEMO, "ct")
    vol, mask = P.render_ct(case, DEMO.volume_shape)
    healthy, empty = P.render_ct(_normal(case), DEMO.volume_shape)
    assert not empty.any()
    slices = mask.any(axis=(1, 2))
    assert 0 < slices.sum() < len(slices)
    gain = vol[mask].astype(float).mean() - healthy[mask].astype(float).mean()
    assert gain > (150 if name == "ground_glass_opacity" else 300)


def test_lung_lesions_are_never_empty_at_demo_size():
    for i in range(60):
        case = P.sample_case(i, DEMO, "ct")
        for f in case.findings:
            _, mask = P.render_ct(dataclasses.replace(case, findings=(f,)), DEMO.volume_shape)
            assert mask.any(), (i, f.name)


def test_patchy_lung_lesions_fill_most_of_a_demo_3d_token():
    """Consolidation and ground glass are lobar-scale: at the demo's CT (3D tokens of 2x16x16 =
    512 voxels) the typical one covers most of a token's worth of voxels, so the coarse 3D
    tokens can see it (docs/benchmarks.md, "Why a lung window"; smaller ones had a median of
    ~340 voxels)."""
    sizes = {"consolidation": [], "ground_glass_opacity": []}
    for i in range(60):
        case = P.sample_case(i, DEMO, "ct")
        for f in case.findings:
            if f.name in sizes:
                _, mask = P.render_ct(dataclasses.replace(case, findings=(f,)), DEMO.volume_shape)
                sizes[f.name].append(int(mask.sum()))
    for name, voxels in sizes.items():
        assert len(voxels) >= 5, name
        assert np.median(voxels) >= 400, (name, sorted(voxels))


def _token_fractions(mask: np.ndarray) -> tuple[float, float]:
    """The largest share of one demo 3D token (2x16x16 voxels) and of one demo slice token (8x8
    pixels of a slice) that a lesion mask [16, 64, 64] covers."""
    per_3d_token = mask.reshape(8, 2, 4, 16, 4, 16).sum(axis=(1, 3, 5)).max() / 512
    per_slice_token = mask.reshape(16, 8, 8, 8, 8).sum(axis=(2, 4)).max() / 64
    return float(per_3d_token), float(per_slice_token)


def test_small_lesions_show_in_a_slice_token_and_dilute_in_a_3d_token():
    """lesions="small": the typical lung lesion covers a third or more of one slice token but a
    fifth or less of a 3D token; the lobar ones fill much of a 3D token."""
    small = dataclasses.replace(DEMO, lesions="small")
    for cfg, in_3d, in_slice in ((small, (0.0, 0.2), (0.3, 1.0)), (DEMO, (0.25, 1.0), None)):
        found = {name: [] for name in ("nodule", "consolidation", "ground_glass_opacity")}
        for i in range(80):
            case = P.sample_case(i, cfg, "ct")
            for f in (f for f in case.findings if f.name in found):
                _, mask = P.render_ct(dataclasses.replace(case, findings=(f,)), DEMO.volume_shape)
                found[f.name].append(_token_fractions(mask))
        for name, fractions in found.items():
            if name == "nodule" and cfg is DEMO:
                continue  # lobar-setting nodules are small too (the reason for the setting)
            median_3d, median_slice = np.median(np.asarray(fractions), axis=0)
            assert len(fractions) >= 8, name
            assert in_3d[0] <= median_3d <= in_3d[1], (cfg.lesions, name, median_3d)
            if in_slice:
                assert in_slice[0] <= median_slice <= in_slice[1], (name, median_slice)


def test_lesion_setting_changes_only_lung_lesion_sizes():
    """Same seed, same cases: the small setting keeps every finding, lobe and anatomy."""
    small = dataclasses.replace(DEMO, lesions="small")
    for i in range(30):
        lobar_case, small_case = P.sample_case(i, DEMO, "ct"), P.sample_case(i, small, "ct")
        assert lobar_case.anatomy == small_case.anatomy
        lobar_f, small_f = lobar_case.findings, small_case.findings
        assert [(f.name, f.lobe) for f in lobar_f] == [(f.name, f.lobe) for f in small_f]
        for a, b in zip(lobar_f, small_f, strict=True):
            if a.name in ("nodule", "consolidation", "ground_glass_opacity"):
                assert max(b.blobs[0].radii) < max(a.blobs[0].radii) or a.name == "nodule"
            else:
                assert a == b


def test_nodule_is_dense_at_its_location_and_small_in_z():
    i = _find("ct", _only("nodule"))
    case = P.sample_case(i, DEMO, "ct")
    vol, mask = P.render_ct(case, DEMO.volume_shape)
    healthy, _ = P.render_ct(_normal(case), DEMO.volume_shape)
    assert vol[mask].mean() > -400 and healthy[mask].mean() < -700
    assert mask.any(axis=(1, 2)).sum() <= 3  # a nodule spans a few slices


def test_upper_lobe_lesions_sit_above_lower_lobe_lesions():
    def centre_slice(lobe: str) -> float:
        i = _find("ct", lambda c: len(c.findings) == 1 and c.findings[0].lobe == lobe)
        _, mask = P.render_ct(P.sample_case(i, DEMO, "ct"), DEMO.volume_shape)
        return np.flatnonzero(mask.any(axis=(1, 2))).mean()

    assert centre_slice("right upper lobe") > centre_slice("right lower lobe")
    assert centre_slice("left upper lobe") > centre_slice("left lower lobe")


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_laterality_in_ct_xray_and_report(side):
    name = f"pleural_effusion_{side}"
    i = _find("ct", _only(name))
    case = P.sample_case(i, DEMO, "ct")
    _, mask = P.render_ct(case, DEMO.volume_shape)
    w = DEMO.volume_shape[2]
    patient_left = mask[:, :, w // 2 :].sum()  # radiological convention: left at high x
    assert (patient_left > 0 and mask[:, :, : w // 2].sum() == 0) == (side == "left")
    depth = DEMO.volume_shape[0]
    z_mass = mask.sum(axis=(1, 2)) @ np.arange(depth) / mask.sum()
    assert z_mass < depth / 3 and not mask[depth // 2 + 2 :].any()  # at the lung base
    posterior = mask[:, DEMO.volume_shape[1] // 2 :].sum()
    assert posterior > 0.7 * mask.sum()  # dependent
    assert any(
        re.search(rf"\b{side}\b", s) and "effusion" in s and not NEGATION.search(s)
        for s in _sentences(P.make_ct(i, DEMO)["report"])
    )

    j = _find("xray", _only(name))
    xcase = P.sample_case(j, DEMO, "xray")
    diff = P.render_xray(xcase, 64).astype(float) - P.render_xray(_normal(xcase), 64)
    image_right = np.clip(diff[:, 32:], 0, None).sum()
    image_left = np.clip(diff[:, :32], 0, None).sum()
    assert (image_right > 5 * image_left) if side == "left" else (image_left > 5 * image_right)
    gain = np.clip(diff, 0, None).sum(axis=1)
    centre_row = gain @ np.arange(64) / gain.sum()
    assert centre_row > 34  # below mid-lung (row 0 is 180 mm above the field centre)


def test_xray_findings_are_visible():
    for name in P.FINDINGS:
        case = P.sample_case(_find("xray", _only(name)), DEMO, "xray")
        diff = P.render_xray(case, 64).astype(float) - P.render_xray(_normal(case), 64)
        assert diff.max() > 20, name


def _reports(modality: str, n: int) -> list[tuple[P.Case, str]]:
    cfg = dataclasses.replace(DEMO, volume_shape=SMALL_CT)
    make = P.make_xray if modality == "xray" else P.make_ct
    return [(P.sample_case(i, cfg, modality), make(i, cfg)["report"]) for i in range(n)]


@pytest.mark.parametrize("modality", P.MODALITIES)
def test_reports_are_consistent_with_labels(modality):
    for case, report in _reports(modality, 300):
        sentences = _sentences(report)
        assert len(sentences) >= 3, report
        assert all(s.endswith(".") and not s[0].islower() for s in sentences), report
        for f in case.findings:
            positive = [
                s
                for s in sentences
                if _mentions(s, f.name, unsided_counts=False) and not NEGATION.search(s)
            ]
            assert positive, (f.name, report)
            negated = [
                s
                for s in sentences
                if _mentions(s, f.name, unsided_counts=True) and NEGATION.search(s)
            ]
            assert not negated, (f.name, report)
            if f.lobe is not None:
                assert any(f.lobe in s.lower() for s in positive), (f.lobe, report)
            if f.size_mm is not None:
                assert f"{f.size_mm} mm" in report, report
        if case.findings:
            assert not NORMAL_IMPRESSION.search(report), report
        if any(f.name != "cardiomegaly" for f in case.findings):
            assert "lungs are clear" not in report, report


@pytest.mark.parametrize("modality", P.MODALITIES)
def test_report_wording_varies(modality):
    reports = [r for _, r in _reports(modality, 200)]
    assert len(set(reports)) > 170
    first_sentences = {_sentences(r)[0] for r in reports}
    assert len(first_sentences) > 20
    assert max(len(r.split()) for r in reports) < 90  # fits a 112-token text encoder


def test_modalities_share_finding_wording():
    xray = " ".join(r for _, r in _reports("xray", 150)).lower()
    ct = " ".join(r for _, r in _reports("ct", 150)).lower()
    for phrase in ("pleural effusion", "nodule", "consolidation", "ground-glass", "cardiomegaly"):
        assert phrase in xray and phrase in ct, phrase
    assert "radiograph" in xray and "radiograph" not in ct
