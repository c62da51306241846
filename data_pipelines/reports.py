"""Report cleaning for MIMIC-CXR, BIMCV-COVID19+ and CT-RATE.

Every report goes the same way: pick its text (report sections, a list literal, CSV columns),
tidy it, split it into sentences and keep it only when it has at least ``min_sentences``
sentences (the paper drops reports with fewer than three). A dropped report comes back as a
``SkipReason`` rather than vanishing, so builders can count skips by reason.

Pure Python (stdlib only): builders import this without numpy or jax.
"""

from __future__ import annotations

import ast
import csv
import enum
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_SENTENCES = 3


class SkipReason(enum.StrEnum):
    """Why a report was dropped; the value is the label a builder prints next to its count."""

    MISSING = "missing report"
    EMPTY = "empty report"
    SHORT = "short report"
    UNPARSEABLE = "unparseable report"
    MISSING_TRANSLATION = "missing translation"


@dataclass(frozen=True)
class CleanReport:
    """A kept report: its sentences and their single-space join (what the text tower reads)."""

    text: str
    sentences: tuple[str, ...]


ReportResult = CleanReport | SkipReason
PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------- text tidying

# Titles stand before a name, so the period after them never ends a sentence.
TITLES = frozenset({"dr", "dra", "drs", "dres", "mr", "mrs", "ms", "prof", "sr", "sra", "srta"})
# English and Spanish abbreviations; none is an ordinary word in either language. Their period
# ends a sentence only when the next word is capitalised ("aprox. 3 cm" vs "... etc. Resto").
ABBREVIATIONS = frozenset(
    {
        "approx", "aprox", "ca", "cf", "dcha", "dcho", "ej", "etc", "fig", "inf", "izq", "izqda",
        "izqdo", "máx", "mín", "núm", "pág", "resp", "sup", "vs",
    }
)  # fmt: skip

_CLOSERS = ")]}\"'»”’"
_OPENERS = "([{\"'«“‘¿¡"
_PLACEHOLDER = r"_{3,}"
_TIDY_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # A title whose name was removed means nothing and would glue two sentences together.
    (re.compile(rf"\b(?:{'|'.join(sorted(TITLES))})\.\s*(?={_PLACEHOLDER})", re.I), ""),
    (re.compile(_PLACEHOLDER), ""),
    (re.compile(r"\(\s*\)"), ""),  # brackets that only held a placeholder
    (re.compile(r"\s+"), " "),  # unwrap lines, collapse runs of blanks
    (re.compile(r"([.!?]) [,;:]+(?= )"), r"\1"),  # "effusion. ___, the" -> "effusion. the"
    (re.compile(r" (?=[,;:!?)]|\.(?!\d))"), ""),  # "to ___." -> "to." (".5 cm" stays)
    (re.compile(r"[,;:]+(?=[.!?])"), ""),  # "on ___, ___." -> "on."
    (re.compile(r"([,;:])[,;:]+"), r"\1"),  # "on ___, ___, at" -> "on, at"
    (re.compile(r"^(?:[ ,;:]|\.(?!\d))+"), ""),  # "___. The lungs" -> "The lungs"
)


def normalize_text(text: str) -> str:
    """Unwrap lines, collapse blanks and drop MIMIC's ``___`` de-identification placeholders.

    A placeholder is removed rather than replaced by a made-up word: it hides a name, date or
    age that the text tower could not use anyway. The spaces and punctuation it leaves behind are
    tidied ("compared to ___." -> "compared to."), and a title before a removed name goes with it
    ("discussed with Dr. ___ at" -> "discussed with at").
    """
    for pattern, replacement in _TIDY_RULES:
        text = pattern.sub(replacement, text)
    return text.strip()


def _join_as_sentences(parts: Iterable[str]) -> str:
    """Join report pieces, ending each with a period so two pieces never merge into one sentence."""
    pieces = []
    for part in parts:
        part = part.strip()
        if part:
            ends_sentence = part.rstrip(_CLOSERS)[-1:] in (".", "!", "?")
            pieces.append(part if ends_sentence else part + ".")
    return " ".join(pieces)


# ------------------------------------------------------------------------ sentence splitting

_LIST_MARKER = re.compile(r"\d{1,2}\.")
_DOTTED_ABBREVIATION = re.compile(r"[^\W\d_]{1,3}(?:\.[^\W\d_]{1,3})+")  # e.g, i.e, p.ej, a.m


def split_sentences(text: str) -> list[str]:
    """Split normalised text into sentences; numbered-list labels become boundaries.

    A period ends a sentence unless it is inside a number ("1.5 cm"), follows a title ("Dr.") or
    follows an abbreviation ("aprox.", "p. ej.", "e.g.") with a lower-case or numeric word after
    it. A list label ("1.", "2.") starts a new sentence and is dropped. Labels are recognised at
    the start of a sentence or after a colon, and inside a sentence only as the next number of a
    list already open and before a capitalised word, so "ribs 5 and 6. No effusion" keeps its 6
    (limit: inside item 1, "ribs 1 and 2. No effusion" is read as a label). Pieces with no letter
    in them are not sentences.
    """
    tokens = text.split()
    sentences: list[str] = []
    current: list[str] = []
    next_item = 1
    for index, token in enumerate(tokens):
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        number = _list_label(token, following, current, next_item)
        if number is not None:
            _flush(current, sentences)
            next_item = number + 1
            continue
        current.append(token)
        if _ends_sentence(token, following):
            _flush(current, sentences)
    _flush(current, sentences)
    return sentences


def _list_label(token: str, following: str, current: list[str], next_item: int) -> int | None:
    """The item number when ``token`` labels a list item, else None."""
    if not following or not _LIST_MARKER.fullmatch(token):
        return None
    number = int(token[:-1])
    opens_item = not current or current[-1].endswith(":")
    continues_list = number == next_item > 1 and following[0].isupper()
    return number if opens_item or continues_list else None


def _ends_sentence(token: str, following: str) -> bool:
    """Whether sentence-final punctuation on ``token`` really ends the sentence."""
    core = token.rstrip(_CLOSERS)
    if core[-1:] in ("!", "?"):
        return True
    if core[-1:] != ".":
        return False
    word = core[:-1].lstrip(_OPENERS).lower()
    if word in TITLES:
        return False
    if _is_abbreviation(word):
        return following[:1].isupper()
    return True


def _is_abbreviation(word: str) -> bool:
    """Known abbreviations, single letters (initials, "p. ej.") and dotted letter groups."""
    single_letter = len(word) == 1 and word.isalpha()
    return word in ABBREVIATIONS or single_letter or bool(_DOTTED_ABBREVIATION.fullmatch(word))


def _flush(current: list[str], sentences: list[str]) -> None:
    """Move the words gathered so far into ``sentences`` if they hold any letter."""
    sentence = " ".join(current)
    if any(char.isalpha() for char in sentence):
        sentences.append(sentence)
    current.clear()


# --------------------------------------------------------------------------- filter


def keep_report(sentences: Sequence[str], min_sentences: int = MIN_SENTENCES) -> bool:
    """The paper's filter: a report needs at least ``min_sentences`` sentences."""
    return len(sentences) >= min_sentences


def clean_report(text: str | None, min_sentences: int = MIN_SENTENCES) -> ReportResult:
    """Normalise, split and filter one report's text; None means the report is missing."""
    if text is None:
        return SkipReason.MISSING
    sentences = split_sentences(normalize_text(text))
    if not sentences:
        return SkipReason.EMPTY
    if not keep_report(sentences, min_sentences):
        return SkipReason.SHORT
    return CleanReport(text=" ".join(sentences), sentences=tuple(sentences))


# --------------------------------------------------------------------------- MIMIC-CXR

# An upper-case header at the start of a line, then a colon; text may follow on the same line.
_HEADER = re.compile(r"^\s*([A-Z][A-Z0-9 ,&/()_'-]*[A-Z)_])\s*:(.*)$")
_BANNER = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.M)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SECTION_ALIASES = {"FINDING": "FINDINGS", "IMPRESSIONS": "IMPRESSION", "CONCLUSION": "IMPRESSION"}


def parse_mimic_sections(text: str) -> dict[str, str]:
    """Section header -> body with lines unwrapped (``___`` kept), for a MIMIC-CXR report.

    Headers are upper case and end with a colon ("WET READ:", "RECOMMENDATION(S):"); a repeated
    header's bodies are joined. Text before the first header, or between the FINAL REPORT
    banner and the next header, belongs to no section. FINDING, IMPRESSIONS and CONCLUSION are
    read as FINDINGS and IMPRESSION.
    """
    bodies: dict[str, list[str]] = {}
    body: list[str] | None = None
    for line in text.splitlines():
        if _BANNER.fullmatch(line):
            body = None  # the banner ends a wet read and starts the final report
        elif match := _HEADER.match(line):
            name = " ".join(match.group(1).split())
            body = bodies.setdefault(_SECTION_ALIASES.get(name, name), [])
            line = match.group(2)
        if body is not None:
            body.append(line)
    return {name: " ".join(" ".join(lines).split()) for name, lines in bodies.items()}


def clean_mimic_report(text: str) -> str:
    """FINDINGS then IMPRESSION, normalised; the last paragraph when neither has text.

    The fallback follows the MIMIC-CXR authors' convention for reports written without sections.
    """
    sections = parse_mimic_sections(text)
    picked = _join_as_sentences(sections.get(name, "") for name in ("FINDINGS", "IMPRESSION"))
    return normalize_text(picked or _last_paragraph(text))


def _last_paragraph(text: str) -> str:
    """The report's last paragraph without the banner or a leading section header."""
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(_BANNER.sub("", text)) if p.strip()]
    if not paragraphs:
        return ""
    lines = paragraphs[-1].strip("\n").splitlines()
    match = _HEADER.match(lines[0])
    if match:
        lines[0] = match.group(2)
    return " ".join(" ".join(lines).split())


def mimic_report(text: str | None, min_sentences: int = MIN_SENTENCES) -> ReportResult:
    """Clean and filter one MIMIC-CXR report text; None means the report is missing."""
    return clean_report(None if text is None else clean_mimic_report(text), min_sentences)


def read_mimic_report(path: PathLike, min_sentences: int = MIN_SENTENCES) -> ReportResult:
    """Read ``files/pXX/pNNNNNNNN/sNNNNNNNN.txt``; a file that is not there is a missing report."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return SkipReason.MISSING
    return mimic_report(text, min_sentences)


# --------------------------------------------------------------------------- tables

_BLANK_CELLS = frozenset({"", "nan", "none", "null"})


def _is_blank(cell: str | None) -> bool:
    """Empty cells and the NaN/None spellings that pandas exports leave behind."""
    return cell is None or cell.strip().lower() in _BLANK_CELLS


def _read_keyed(
    path: PathLike, *, delimiter: str, key: str, columns: Sequence[str], what: str
) -> dict[str, dict[str, str]]:
    """Rows of a CSV/TSV keyed by one column; errors name the file, the line and the column."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, restval="")
        found = list(reader.fieldnames or [])
        missing = [column for column in columns if column not in found]
        if missing:
            raise ValueError(
                f"{path}: {what} has no column {', '.join(missing)}; columns found: "
                f"{', '.join(found) or 'none (empty file)'}. Needed: {', '.join(columns)}."
            )
        rows: dict[str, dict[str, str]] = {}
        for row in reader:
            name = (row[key] or "").strip()
            if not name:
                raise ValueError(f"{path}, line {reader.line_num}: empty {key} in {what}.")
            if name in rows:
                raise ValueError(f"{path}, line {reader.line_num}: {key} {name!r} appears twice.")
            rows[name] = row
    return rows


# --------------------------------------------------------------------------- BIMCV-COVID19+


def read_bimcv_sessions(tsv_path: PathLike) -> dict[str, str]:
    """session_id -> raw ``medical_evaluation`` cell of one subject's ``sub-*_sessions.tsv``."""
    rows = _read_keyed(
        tsv_path,
        delimiter="\t",
        key="session_id",
        columns=("session_id", "medical_evaluation"),
        what="BIMCV sessions file (tab-separated)",
    )
    return {session: row["medical_evaluation"] or "" for session, row in rows.items()}


def parse_bimcv_evaluation(cell: str | None) -> str | SkipReason:
    """The report text held by a ``medical_evaluation`` cell, or why there is none.

    Cells hold a Python list literal of strings, read with ``ast.literal_eval`` (never eval). The
    items are joined as separate sentences. A blank, NaN or None cell is a missing report; an
    empty list, or one of blank items, an empty report. A cell that starts like a list but is not
    a list of strings is skipped as unparseable rather than used raw: it is most likely truncated,
    and its brackets and quotes would go into the text tower. A cell that does not start with
    "[" is taken as plain text.
    """
    if cell is None or _is_blank(cell):
        return SkipReason.MISSING
    cell = cell.strip()
    if not cell.startswith("["):
        return cell
    try:
        items = ast.literal_eval(cell)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return SkipReason.UNPARSEABLE
    if not isinstance(items, list) or not all(isinstance(i, str | None) for i in items):
        return SkipReason.UNPARSEABLE
    return _join_as_sentences(item for item in items if item) or SkipReason.EMPTY


def load_translations(path: PathLike) -> dict[str, str]:
    """session_id -> English report, from a CSV with columns ``session_id`` and ``text``."""
    rows = _read_keyed(
        path,
        delimiter=",",
        key="session_id",
        columns=("session_id", "text"),
        what="BIMCV translation file (CSV)",
    )
    return {session: row["text"] or "" for session, row in rows.items()}


def bimcv_reports(
    tsv_path: PathLike,
    translations: Mapping[str, str] | None = None,
    min_sentences: int = MIN_SENTENCES,
) -> dict[str, ReportResult]:
    """Cleaned report (or skip reason) for every session in one ``sub-*_sessions.tsv``.

    With ``translations`` the English text replaces the Spanish one, and a session it lacks is
    skipped ("missing translation") so no Spanish text slips into an English corpus.
    """
    results: dict[str, ReportResult] = {}
    for session, cell in read_bimcv_sessions(tsv_path).items():
        if translations is not None:
            text = translations.get(session)
            results[session] = (
                SkipReason.MISSING_TRANSLATION
                if text is None
                else clean_report(text, min_sentences)
            )
            continue
        parsed = parse_bimcv_evaluation(cell)
        results[session] = (
            parsed if isinstance(parsed, SkipReason) else clean_report(parsed, min_sentences)
        )
    return results


# --------------------------------------------------------------------------- CT-RATE

CT_RATE_SECTIONS = ("Findings_EN", "Impressions_EN")


def _ct_rate_section(cell: str | None) -> str:
    """A CT-RATE section's text; "Not given." and NaN mean the section is empty."""
    if cell is None or _is_blank(cell) or cell.strip().rstrip(".").lower() == "not given":
        return ""
    return cell


def read_ct_rate_reports(
    csv_path: PathLike, min_sentences: int = MIN_SENTENCES
) -> dict[str, ReportResult]:
    """VolumeName -> cleaned Findings_EN + Impressions_EN (or skip reason) from a reports CSV.

    A volume with no row is not in the result; builders count it as ``SkipReason.MISSING``.
    """
    rows = _read_keyed(
        csv_path,
        delimiter=",",
        key="VolumeName",
        columns=("VolumeName", *CT_RATE_SECTIONS),
        what="CT-RATE reports file (CSV)",
    )
    return {
        volume: clean_report(
            _join_as_sentences(_ct_rate_section(row[c]) for c in CT_RATE_SECTIONS), min_sentences
        )
        for volume, row in rows.items()
    }
