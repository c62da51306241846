"""The project describes the present: no text file names a work session or an issue by its
number (the word "session" or "issue", singular or plural, any case, then a number, a range or
"#" and a number). What happened when is in git; the docs give what is true now and the command
that shows it."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where the project's own text lives. A file git does not track yet counts when it lies here (a
# new module or page); elsewhere it is a run's output (`export/`, a figure, embeddings), not text
# of the project.
PROJECT = ("README.md", "docs", "configs", "tests", "unimedi_jax", "data_pipelines", "launch")
# "session" or "issue" (any case, singular or plural) as a whole word, then a number, possibly
# after "#". BIMCV's "sessions.tsv", "session_id" and "ses-E0001" are not the word followed by a
# number; "tissue" is not the word "issue". The examples are in the tests below.
HISTORY = re.compile(r"\b(?:session|issue)s?\s*#?\s*\d", re.IGNORECASE)
# Another project's issue, named after its repository ("owner/name/issues/40"), is a citation.
CITED_REPOSITORY = re.compile(r"[\w.-]+/[\w.-]+\s+$")


def _git_files(*options: str) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", *options, "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [name for name in listed.split("\0") if name]


def _in_project(name: str) -> bool:
    return name.split("/")[0] in PROJECT and "__pycache__" not in name.split("/")


def _project_files() -> list[Path]:
    """Tracked files, and new files in the project's folders; without git, those folders."""
    try:
        names = _git_files("--cached") + [
            n for n in _git_files("--others", "--exclude-standard") if _in_project(n)
        ]
    except (OSError, subprocess.CalledProcessError):
        names = [
            str(p.relative_to(ROOT))
            for top in PROJECT
            for p in ([ROOT / top] if (ROOT / top).is_file() else (ROOT / top).rglob("*"))
        ]
        names = [n for n in names if _in_project(n)]
    return [ROOT / name for name in sorted(set(names)) if (ROOT / name).is_file()]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a figure, a wheel)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _history_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each match, also of one a line break splits ("session" / "8")."""
    lines = text.splitlines()
    numbers = sorted(
        {
            text.count("\n", 0, m.start()) + 1
            for m in HISTORY.finditer(text)
            if not CITED_REPOSITORY.search(text[max(0, m.start() - 100) : m.start()])
        }
    )
    return [(number, lines[number - 1].strip()) for number in numbers]


# Built by joining, so that this file holds no phrase it forbids.
_S, _I = "Ses" + "sion", "Is" + "sue"


@pytest.mark.parametrize(
    "line",
    [
        f'docs/benchmarks.md, "{_S} 8")',
        f"the demo meets {_I.lower()} 17's bar",
        f"{_S.lower()}s 3-5 measured",
        f"({_I.lower()} #6)",
        f"{_I.upper()}S 2 and 3",
        f"since {_S.lower()}\n7",
    ],
)
def test_the_pattern_finds_history(line):
    assert HISTORY.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "a bad BIMCV `sessions.tsv` skips that subject's sessions",
        'path = root / subject / f"{subject}_sessions.tsv"',
        'run2 = next(r for r in records if _text(r["session_id"]) == "ses-E00001")',
        "One record per session that holds a CT (`sub-*/ses-*/mod-rx/*_ct.nii.gz`)",
        "upper abdomen: soft tissue 3 cm below",
        "start_new_session=True,",
        "No issue: 2 cores are enough.",
    ],
)
def test_the_pattern_leaves_other_words_alone(line):
    assert not HISTORY.search(line)


def test_another_projects_issue_is_a_citation():
    assert _history_lines(f'"where": "github owner/CT-CLIP {_I.lower()} 40",') == []
    assert _history_lines(f"fixed in {_I.lower()} 40 of ours") != []


def test_the_walk_reads_the_project():
    names = {str(p.relative_to(ROOT)) for p in _project_files()}
    assert {
        "README.md",
        "docs/benchmarks.md",
        "configs/pretrain.py",
        "tests/test_no_history.py",
    } <= names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)


def test_no_file_names_a_session_or_an_issue_by_number():
    found = []
    for path in _project_files():
        text = _text(path)
        if text is None:
            continue
        for number, line in _history_lines(text):
            found.append(f"{path.relative_to(ROOT)}:{number}: {line[:120]}")
    assert not found, "history in the project's text (say what is true now):\n" + "\n".join(found)
