"""Report cleaning on fixtures written in the datasets' real file formats."""

from pathlib import Path

import pytest

from data_pipelines.reports import (
    CleanReport,
    SkipReason,
    bimcv_reports,
    clean_mimic_report,
    clean_report,
    keep_report,
    load_translations,
    mimic_report,
    normalize_text,
    parse_bimcv_evaluation,
    parse_mimic_sections,
    read_bimcv_sessions,
    read_ct_rate_reports,
    read_mimic_report,
    split_sentences,
)


def _lines(*lines: str) -> str:
    """A file's text from its lines, so blank lines holding one space survive editors."""
    return "\n".join(lines) + "\n"


# MIMIC-CXR files: banner, headers with the body on the next lines or on the same line, lines
# wrapped at ~78 columns with a leading space, blank lines holding one space, ``___``.
MIMIC_FULL = _lines(
    "                                 FINAL REPORT",
    " EXAMINATION:  CHEST (PA AND LAT)",
    " ",
    " INDICATION:  ___M with cough and fever, evaluate for pneumonia.",
    " ",
    " TECHNIQUE:  Chest PA and lateral",
    " ",
    " COMPARISON:  Chest radiograph from ___.",
    " ",
    " FINDINGS: ",
    " ",
    " Heart size is mildly enlarged.  A 1.5 cm nodular opacity projects over the",
    " right lower lobe, approx. 2 cm from the hilum, compared to ___ when it",
    " measured 1.2 cm.  There is no pleural effusion or pneumothorax.",
    " ",
    " IMPRESSION: ",
    " ",
    " 1.  Right lower lobe nodular opacity, possibly pneumonia in the appropriate",
    " clinical setting.",
    " 2.  Mild cardiomegaly.",
    " ",
    " NOTIFICATION:  The findings were discussed with Dr. ___ by Dr. ___ on the",
    " telephone on ___ at 10:15 AM, 2 minutes after discovery of the findings.",
)

MIMIC_IMPRESSION_ONLY = _lines(
    "                                 FINAL REPORT",
    " HISTORY:  ___-year-old woman with shortness of breath.",
    " ",
    " IMPRESSION:  PA and lateral chest compared to ___:",
    " ",
    " Lungs are clear.  No pleural effusion.  Heart size is normal.",
)

MIMIC_NO_SECTIONS = _lines(
    "                                 FINAL REPORT",
    " CHEST RADIOGRAPH PERFORMED ON ___",
    " ",
    " COMPARISON:  None.",
    " ",
    " CLINICAL HISTORY:  Fever, question pneumonia.",
    " ",
    " PORTABLE AP UPRIGHT CHEST:  The lungs are clear.  The cardiomediastinal",
    " silhouette is within normal limits.  No acute osseous abnormality.",
)

MIMIC_WET_READ = _lines(
    " WET READ: ___ ___ 8:54 PM",
    "  Left basilar opacity.",
    " ______________________________________________________________________________",
    "                                 FINAL REPORT",
    " INDICATION:  Chest pain.",
    " ",
    " FINDINGS:  Left basilar opacity, likely atelectasis.",
    " ",
    " IMPRESSION:  No acute cardiopulmonary process.",
    " ",
    " RECOMMENDATION(S):  Follow-up radiograph in ___ weeks.",
)

FULL_SENTENCES = [
    "Heart size is mildly enlarged.",
    "A 1.5 cm nodular opacity projects over the right lower lobe, approx. 2 cm from the hilum, "
    "compared to when it measured 1.2 cm.",
    "There is no pleural effusion or pneumothorax.",
    "Right lower lobe nodular opacity, possibly pneumonia in the appropriate clinical setting.",
    "Mild cardiomegaly.",
]


def test_parse_mimic_sections_unwraps_bodies_and_keeps_placeholders():
    sections = parse_mimic_sections(MIMIC_FULL)
    assert list(sections) == [
        "EXAMINATION",
        "INDICATION",
        "TECHNIQUE",
        "COMPARISON",
        "FINDINGS",
        "IMPRESSION",
        "NOTIFICATION",
    ]
    assert sections["EXAMINATION"] == "CHEST (PA AND LAT)"
    assert sections["COMPARISON"] == "Chest radiograph from ___."
    assert sections["FINDINGS"] == (
        "Heart size is mildly enlarged. A 1.5 cm nodular opacity projects over the right lower "
        "lobe, approx. 2 cm from the hilum, compared to ___ when it measured 1.2 cm. There is no "
        "pleural effusion or pneumothorax."
    )
    assert sections["IMPRESSION"] == (
        "1. Right lower lobe nodular opacity, possibly pneumonia in the appropriate clinical "
        "setting. 2. Mild cardiomegaly."
    )


def test_parse_mimic_sections_reads_wet_read_and_recommendations():
    sections = parse_mimic_sections(MIMIC_WET_READ)
    assert sections["WET READ"] == (
        "___ ___ 8:54 PM Left basilar opacity. "
        "______________________________________________________________________________"
    )
    assert sections["RECOMMENDATION(S)"] == "Follow-up radiograph in ___ weeks."
    assert sections["FINDINGS"] == "Left basilar opacity, likely atelectasis."


def test_clean_mimic_report_takes_findings_then_impression():
    assert clean_mimic_report(MIMIC_FULL) == (
        "Heart size is mildly enlarged. A 1.5 cm nodular opacity projects over the right lower "
        "lobe, approx. 2 cm from the hilum, compared to when it measured 1.2 cm. There is no "
        "pleural effusion or pneumothorax. 1. Right lower lobe nodular opacity, possibly "
        "pneumonia in the appropriate clinical setting. 2. Mild cardiomegaly."
    )
    assert split_sentences(clean_mimic_report(MIMIC_FULL)) == FULL_SENTENCES


def test_clean_mimic_report_with_only_impression():
    text = clean_mimic_report(MIMIC_IMPRESSION_ONLY)
    assert text == (
        "PA and lateral chest compared to: Lungs are clear. No pleural effusion. "
        "Heart size is normal."
    )
    assert split_sentences(text) == [
        "PA and lateral chest compared to: Lungs are clear.",
        "No pleural effusion.",
        "Heart size is normal.",
    ]


def test_clean_mimic_report_falls_back_to_last_paragraph_without_its_header():
    assert clean_mimic_report(MIMIC_NO_SECTIONS) == (
        "The lungs are clear. The cardiomediastinal silhouette is within normal limits. "
        "No acute osseous abnormality."
    )


def test_clean_mimic_report_ends_findings_without_period_before_impression():
    report = " FINDINGS:  Lungs are clear\n \n IMPRESSION:  No acute process.\n"
    assert clean_mimic_report(report) == "Lungs are clear. No acute process."


def test_mimic_report_keeps_long_and_drops_short_reports():
    assert mimic_report(MIMIC_FULL) == CleanReport(
        text=" ".join(FULL_SENTENCES), sentences=tuple(FULL_SENTENCES)
    )
    assert mimic_report(MIMIC_WET_READ) is SkipReason.SHORT  # findings + impression: 2 sentences
    assert mimic_report(MIMIC_WET_READ, min_sentences=2) == CleanReport(
        text="Left basilar opacity, likely atelectasis. No acute cardiopulmonary process.",
        sentences=(
            "Left basilar opacity, likely atelectasis.",
            "No acute cardiopulmonary process.",
        ),
    )
    assert mimic_report(None) is SkipReason.MISSING
    assert mimic_report(" FINDINGS:  ___.\n") is SkipReason.EMPTY


def test_read_mimic_report_missing_file(tmp_path: Path):
    path = tmp_path / "files" / "p10" / "p10000032" / "s50414267.txt"
    assert read_mimic_report(path) is SkipReason.MISSING
    path.parent.mkdir(parents=True)
    path.write_text(MIMIC_IMPRESSION_ONLY, encoding="utf-8")
    assert read_mimic_report(path) == CleanReport(
        text="PA and lateral chest compared to: Lungs are clear. No pleural effusion. "
        "Heart size is normal.",
        sentences=(
            "PA and lateral chest compared to: Lungs are clear.",
            "No pleural effusion.",
            "Heart size is normal.",
        ),
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Compared to ___, the lungs are clear.", "Compared to, the lungs are clear."),
        ("Compared to ___.", "Compared to."),
        ("Discussed with Dr. ___ at 10:15.", "Discussed with at 10:15."),
        ("Discussed with Dr. ___.", "Discussed with."),
        ("Prior study (___) is unchanged.", "Prior study is unchanged."),
        ("No effusion. ___, the lungs are clear.", "No effusion. the lungs are clear."),
        ("Seen on ___, ___. No change.", "Seen on. No change."),
        ("Seen on ___, ___, at noon.", "Seen on, at noon."),
        ("___. The lungs are clear.", "The lungs are clear."),
        ("  Lungs\n are   clear.\n", "Lungs are clear."),
        ("Measures .5 cm, e.g., a nodule.", "Measures .5 cm, e.g., a nodule."),
    ],
)
def test_normalize_text_drops_placeholders_and_tidies(raw: str, expected: str):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "A 1.5 cm nodule, approx. 2 cm from the hilum. Dr. Smith was paged. No effusion.",
            [
                "A 1.5 cm nodule, approx. 2 cm from the hilum.",
                "Dr. Smith was paged.",
                "No effusion.",
            ],
        ),
        ("Paged at 10 a.m. The lungs are clear.", ["Paged at 10 a.m.", "The lungs are clear."]),
        ("Effusion, e.g. small. Clear.", ["Effusion, e.g. small.", "Clear."]),
        (
            "Is it pneumonia? Unclear! (See prior.) Clear.",
            ["Is it pneumonia?", "Unclear!", "(See prior.)", "Clear."],
        ),
        ("1. No acute process 2. Stable cardiomegaly", ["No acute process", "Stable cardiomegaly"]),
        ("As follows: 1. Effusion. 2. Edema.", ["As follows:", "Effusion.", "Edema."]),
        ("Fractures of ribs 5 and 6. No effusion.", ["Fractures of ribs 5 and 6.", "No effusion."]),
        ("Fracture of rib 1. No effusion.", ["Fracture of rib 1.", "No effusion."]),
        ("Clear. 2. 3.", ["Clear."]),
        ("", []),
        # Spanish
        (
            "Opacidades periféricas, p. ej. en LSD. Sin derrame, etc. Resto normal.",
            ["Opacidades periféricas, p. ej. en LSD.", "Sin derrame, etc.", "Resto normal."],
        ),
        (
            "Nódulo de aprox. 3 mm, p.ej. granuloma. Informado a la Dra. Pérez. Sin cambios.",
            [
                "Nódulo de aprox. 3 mm, p.ej. granuloma.",
                "Informado a la Dra. Pérez.",
                "Sin cambios.",
            ],
        ),
    ],
)
def test_split_sentences(text: str, expected: list[str]):
    assert split_sentences(text) == expected


def test_keep_report_and_clean_report_reasons():
    assert keep_report(["a.", "b.", "c."])
    assert not keep_report(["a.", "b."])
    assert keep_report(["a.", "b."], min_sentences=2)
    assert clean_report(None) is SkipReason.MISSING
    assert clean_report("  \n ") is SkipReason.EMPTY
    assert clean_report("___. 1.") is SkipReason.EMPTY
    assert clean_report("One. Two.") is SkipReason.SHORT
    assert clean_report("One.\n Two.  Three") == CleanReport(
        text="One. Two. Three", sentences=("One.", "Two.", "Three")
    )
    assert str(SkipReason.SHORT) == "short report"
    assert str(SkipReason.UNPARSEABLE) == "unparseable report"


# BIMCV-COVID19+ sub-*_sessions.tsv: tab-separated; the first row's cell is quoted the way csv
# writers quote a field holding '"' (the list has an item with an apostrophe, so Python's repr
# wrote it between double quotes); the others are unquoted as written by hand.
BIMCV_TSV = (
    "participant\tsession_id\tmedical_evaluation\n"
    "sub-S03044\tses-E07085\t\"['Se compara con estudio previo del 12.05.2020.', "
    '""Patrón \'en empedrado\' bilateral, de predominio periférico, aprox. 3 cm en LID"", '
    "'Informado al Dr. García. Resto sin cambios.']\"\n"
    "sub-S03044\tses-E07086\t['Estudio sin cambios significativos.']\n"
    "sub-S03044\tses-E07087\t['Se compara con estudio previo, sin cambios\n"
    "sub-S03044\tses-E07088\t[]\n"
    "sub-S03044\tses-E07089\t\n"
    "sub-S03044\tses-E07090\tNone\n"
    "sub-S03044\tses-E07091\tnan\n"
    "sub-S03044\tses-E07092\tSin consolidaciones. Senos costofrénicos libres. Sin derrame.\n"
    "sub-S03044\tses-E07093\t['', '  ']\n"
)

BIMCV_E07085_SENTENCES = (
    "Se compara con estudio previo del 12.05.2020.",
    "Patrón 'en empedrado' bilateral, de predominio periférico, aprox. 3 cm en LID.",
    "Informado al Dr. García.",
    "Resto sin cambios.",
)


@pytest.fixture
def bimcv_tsv(tmp_path: Path) -> Path:
    path = tmp_path / "sub-S03044" / "sub-S03044_sessions.tsv"
    path.parent.mkdir()
    path.write_text(BIMCV_TSV, encoding="utf-8")
    return path


def test_read_bimcv_sessions_returns_raw_cells(bimcv_tsv: Path):
    sessions = read_bimcv_sessions(bimcv_tsv)
    assert list(sessions) == [f"ses-E0708{i}" for i in range(5, 10)] + [
        "ses-E07090",
        "ses-E07091",
        "ses-E07092",
        "ses-E07093",
    ]
    assert sessions["ses-E07085"] == (
        "['Se compara con estudio previo del 12.05.2020.', "
        "\"Patrón 'en empedrado' bilateral, de predominio periférico, aprox. 3 cm en LID\", "
        "'Informado al Dr. García. Resto sin cambios.']"
    )
    assert sessions["ses-E07087"] == "['Se compara con estudio previo, sin cambios"
    assert sessions["ses-E07089"] == ""


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("['Primero.', 'Segundo sin punto']", "Primero. Segundo sin punto."),
        ("['Se compara con estudio previo, sin cambios", SkipReason.UNPARSEABLE),
        ("[1, 2]", SkipReason.UNPARSEABLE),
        ("[__import__('os')]", SkipReason.UNPARSEABLE),
        ("[]", SkipReason.EMPTY),
        ("['', None]", SkipReason.EMPTY),
        ("", SkipReason.MISSING),
        (None, SkipReason.MISSING),
        ("None", SkipReason.MISSING),
        ("NaN", SkipReason.MISSING),
        ("  Texto libre.  ", "Texto libre."),
    ],
)
def test_parse_bimcv_evaluation(cell: str | None, expected: str | SkipReason):
    assert parse_bimcv_evaluation(cell) == expected


def test_bimcv_reports_spanish(bimcv_tsv: Path):
    reports = bimcv_reports(bimcv_tsv)
    assert reports["ses-E07085"] == CleanReport(
        text=" ".join(BIMCV_E07085_SENTENCES), sentences=BIMCV_E07085_SENTENCES
    )
    assert reports["ses-E07092"] == CleanReport(
        text="Sin consolidaciones. Senos costofrénicos libres. Sin derrame.",
        sentences=("Sin consolidaciones.", "Senos costofrénicos libres.", "Sin derrame."),
    )
    skips = {session: result for session, result in reports.items() if session[-2:] != "85"}
    assert skips == {
        "ses-E07086": SkipReason.SHORT,
        "ses-E07087": SkipReason.UNPARSEABLE,
        "ses-E07088": SkipReason.EMPTY,
        "ses-E07089": SkipReason.MISSING,
        "ses-E07090": SkipReason.MISSING,
        "ses-E07091": SkipReason.MISSING,
        "ses-E07092": reports["ses-E07092"],
        "ses-E07093": SkipReason.EMPTY,
    }


def test_bimcv_reports_translations_replace_spanish(bimcv_tsv: Path, tmp_path: Path):
    translations_csv = tmp_path / "translations.csv"
    translations_csv.write_text(
        "session_id,text\n"
        'ses-E07085,"Compared with the previous study. Bilateral ground-glass opacities, '
        'approx. 3 cm. No pleural effusion."\n'
        "ses-E07087,Study without changes. Lungs are clear. No effusion.\n"
        "ses-E07088,\n",
        encoding="utf-8",
    )
    translations = load_translations(translations_csv)
    assert translations == {
        "ses-E07085": "Compared with the previous study. Bilateral ground-glass opacities, "
        "approx. 3 cm. No pleural effusion.",
        "ses-E07087": "Study without changes. Lungs are clear. No effusion.",
        "ses-E07088": "",
    }
    reports = bimcv_reports(bimcv_tsv, translations)
    assert reports["ses-E07085"] == CleanReport(
        text="Compared with the previous study. Bilateral ground-glass opacities, approx. 3 cm. "
        "No pleural effusion.",
        sentences=(
            "Compared with the previous study.",
            "Bilateral ground-glass opacities, approx. 3 cm.",
            "No pleural effusion.",
        ),
    )
    assert reports["ses-E07087"] == CleanReport(
        text="Study without changes. Lungs are clear. No effusion.",
        sentences=("Study without changes.", "Lungs are clear.", "No effusion."),
    )
    assert reports["ses-E07088"] is SkipReason.EMPTY
    assert reports["ses-E07086"] is SkipReason.MISSING_TRANSLATION
    assert reports["ses-E07092"] is SkipReason.MISSING_TRANSLATION


def test_load_translations_names_file_and_missing_column(tmp_path: Path):
    path = tmp_path / "bimcv_en.csv"
    path.write_text("session,text\nses-E07085,Clear.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bimcv_en\.csv: .* has no column session_id;") as err:
        load_translations(path)
    assert "columns found: session, text" in str(err.value)


def test_read_bimcv_sessions_names_file_and_missing_column(tmp_path: Path):
    path = tmp_path / "sub-S1_sessions.tsv"
    path.write_text("session_id\treport\nses-E1\tx\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"sub-S1_sessions\.tsv: .* no column medical_evaluation"):
        read_bimcv_sessions(path)
    path.write_text("participant\tmedical_evaluation\nsub-S1\tx\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"sub-S1_sessions\.tsv: .* no column session_id"):
        read_bimcv_sessions(path)


def test_read_bimcv_sessions_rejects_duplicate_and_empty_session_ids(tmp_path: Path):
    path = tmp_path / "sub-S1_sessions.tsv"
    path.write_text("session_id\tmedical_evaluation\nses-E1\ta\nses-E1\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"sub-S1_sessions\.tsv, line 3: session_id 'ses-E1'"):
        read_bimcv_sessions(path)
    path.write_text("session_id\tmedical_evaluation\n\ta\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"sub-S1_sessions\.tsv, line 2: empty session_id"):
        read_bimcv_sessions(path)


# CT-RATE radiology_text_reports/train_reports.csv: comma-separated, quoted where needed.
CT_RATE_CSV = (
    "VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN\n"
    'train_1_a_1.nii.gz,Not given.,"Non-contrast images were taken in axial plane with 1 mm '
    'slice thickness.","Trachea and both main bronchi are open. No mass was detected in the '
    'mediastinum. A 4.5 mm nodule is seen in the right upper lobe.",Nodule in the right upper '
    "lobe\n"
    "train_2_a_1.nii.gz,Fever.,Not given.,Not given.,"
    '"Bilateral ground glass opacities, consistent with viral pneumonia. Follow-up is '
    'recommended."\n'
    "train_3_a_1.nii.gz,Not given.,Not given.,Not given.,Not given.\n"
    "train_4_a_1.nii.gz,,,,\n"
    "train_5_a_1.nii.gz,,,nan,Not given\n"
)


def test_read_ct_rate_reports(tmp_path: Path):
    path = tmp_path / "radiology_text_reports" / "train_reports.csv"
    path.parent.mkdir()
    path.write_text(CT_RATE_CSV, encoding="utf-8")
    sentences = (
        "Trachea and both main bronchi are open.",
        "No mass was detected in the mediastinum.",
        "A 4.5 mm nodule is seen in the right upper lobe.",
        "Nodule in the right upper lobe.",
    )
    assert read_ct_rate_reports(path) == {
        "train_1_a_1.nii.gz": CleanReport(text=" ".join(sentences), sentences=sentences),
        "train_2_a_1.nii.gz": SkipReason.SHORT,
        "train_3_a_1.nii.gz": SkipReason.EMPTY,
        "train_4_a_1.nii.gz": SkipReason.EMPTY,
        "train_5_a_1.nii.gz": SkipReason.EMPTY,
    }
    assert read_ct_rate_reports(path, min_sentences=2)["train_2_a_1.nii.gz"] == CleanReport(
        text="Bilateral ground glass opacities, consistent with viral pneumonia. "
        "Follow-up is recommended.",
        sentences=(
            "Bilateral ground glass opacities, consistent with viral pneumonia.",
            "Follow-up is recommended.",
        ),
    )


def test_read_ct_rate_reports_names_file_and_missing_columns(tmp_path: Path):
    path = tmp_path / "train_reports.csv"
    path.write_text("VolumeName,Findings_EN\ntrain_1_a_1.nii.gz,Clear.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train_reports\.csv: .* no column Impressions_EN;"):
        read_ct_rate_reports(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"no column VolumeName, Findings_EN, Impressions_EN; columns found: none"
    ):
        read_ct_rate_reports(path)
