"""TFDS builder for BIMCV-COVID19+ chest CT with its Spanish reports (3D).

One record per session that holds a CT (`sub-*/ses-*/mod-rx/*_ct.nii.gz`; the X-rays next to
them are not read): of the session's CT runs, the axial one with the most slices, canonicalised
and resized to `volume_shape` as int16 HU. The report is the session's `medical_evaluation` (a
Python list literal of Spanish sentences, joined), or its English text from the `translations`
CSV (columns session_id, text), kept with at least three sentences. BIMCV gives no finding
labels: `labels` is an empty float32 vector, so readers that expect the field still find it.

There is no official split: subjects are split 90/5/5 into train/validation/test by a seeded
permutation, so no subject is in two splits. Skipped sessions are counted per split and reason:
missing/short/empty/unparseable report, missing translation, unreadable report (every session
of a subject whose sessions.tsv is empty, not UTF-8 or malformed), and the volume reasons of
`data_pipelines.imaging` (not axial, unreadable file, too small, ...) of the largest run when
no run is usable.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds
from nibabel import orientations

from data_pipelines import imaging
from data_pipelines.builders import common
from data_pipelines.reports import (
    CleanReport,
    ReportResult,
    SkipReason,
    bimcv_reports,
    load_translations,
)

VERSION = "1.0.0"
OPTIONS = ("volume_shape", "seed", "translations", "num_workers")
_RECORDED = ("volume_shape", "seed", "translations")
HELD_OUT = {"validation": 0.05, "test": 0.05}
CT_GLOB = "ses-*/mod-rx/*_ct.nii.gz"
_HEADER_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)

LAYOUT = (
    "the BIMCV-COVID19+ subject folders (e.g. the covid19_posi/ folder of the unpacked "
    "release): sub-S*/ses-E*/mod-rx/*_ct.nii.gz with their JSON sidecars, and "
    "sub-S*/sub-S*_sessions.tsv (columns session_id, medical_evaluation) per subject"
)


@dataclasses.dataclass(kw_only=True)
class BimcvConfig(tfds.core.BuilderConfig):
    """Stored volume shape, split seed, optional English reports, reader processes."""

    volume_shape: tuple[int, int, int] = (32, 128, 128)
    seed: int = 0
    translations: str | None = None
    num_workers: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Session:
    """One CT session: its report (or skip reason) and CT runs, ready for a worker."""

    subject_id: str
    session_id: str
    report: ReportResult | common.Skip
    runs: tuple[str, ...]
    volume_shape: tuple[int, int, int]


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The root, if it holds subject folders with CT files (else LayoutError)."""
    root = Path(manual_dir)
    common.require(root, root, LAYOUT)
    subjects = [p for p in root.glob("sub-*") if p.is_dir()]
    if not subjects:
        raise common.LayoutError(f"no sub-* subject folders in {root}; expected {LAYOUT}")
    if not any(next(s.glob(CT_GLOB), None) for s in subjects):
        raise common.LayoutError(
            f"no CT files ({CT_GLOB}) in the {len(subjects)} subject folders of {root}; "
            f"expected {LAYOUT}"
        )
    return root


class BimcvCovid19(tfds.core.GeneratorBasedBuilder):
    """BIMCV-COVID19+ chest CT volumes with their reports, one per session."""

    name = "bimcv_covid19"
    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Point manual_dir at {LAYOUT} (see docs/data.md)."

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "volume": common.raw_array(self.builder_config.volume_shape, np.int16),
            **common.report_features(0),  # no labels
            "subject_id": tfds.features.Text(),
            "session_id": tfds.features.Text(),
            "id": tfds.features.Text(),
        }
        return common.dataset_info(self, __doc__, features, _RECORDED, labels=[])

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        cfg = self.builder_config
        root = check_manual_dir(dl_manager.manual_dir)
        translations = None
        if cfg.translations:
            with common.utf8(cfg.translations):
                translations = load_translations(cfg.translations)
        sessions = _sessions(root, translations, cfg.volume_shape)
        split_of = common.split_groups({s.subject_id for s in sessions}, HELD_OUT, cfg.seed)
        by_split = {split: [] for split in ("train", *HELD_OUT)}
        for session in sessions:
            by_split[split_of[session.subject_id]].append(session)
        return {split: self._generate_examples(split, tasks) for split, tasks in by_split.items()}

    def _generate_examples(
        self, split: str, sessions: Sequence[_Session]
    ) -> Iterator[tuple[int, dict]]:
        return common.generate(self, split, sessions, _load)


def _sessions(
    root: Path, translations: dict[str, str] | None, volume_shape: tuple[int, int, int]
) -> list[_Session]:
    """Every session with at least one CT run, sorted by subject and session."""
    if translations is not None:  # sessions files and translations may differ in prefix
        translations = {
            form: text
            for session, text in translations.items()
            for form in (_session_dir(session), _session_dir(session).removeprefix("ses-"))
        }
    out = []
    for subject in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        runs: dict[str, list[str]] = {}
        for path in sorted(subject.glob(CT_GLOB)):
            runs.setdefault(path.parent.parent.name, []).append(str(path))
        if not runs:
            continue
        reports = _subject_reports(subject, translations)
        if isinstance(reports, common.Skip):  # an unreadable sessions.tsv: each session skips
            reports = dict.fromkeys(runs, reports)
        out += [
            _Session(
                subject_id=subject.name,
                session_id=session,
                report=reports.get(session, SkipReason.MISSING),
                runs=tuple(paths),
                volume_shape=volume_shape,
            )
            for session, paths in sorted(runs.items())
        ]
    return out


def _subject_reports(subject: Path, translations: dict[str, str] | None) -> dict | common.Skip:
    """session folder name -> cleaned report or skip reason; {} without a sessions.tsv; a Skip
    naming the file when it cannot be read (empty, not UTF-8, no such columns, a session
    twice): then none of the subject's reports is known."""
    tsv = subject / f"{subject.name}_sessions.tsv"
    if not tsv.is_file():
        return {}
    try:
        reports = bimcv_reports(tsv, translations)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        detail = str(e) if str(tsv) in str(e) else f"{tsv}: {e}"
        return common.Skip(common.UNREADABLE_REPORT, detail)
    return {_session_dir(k): v for k, v in reports.items()}


def _session_dir(session_id: str) -> str:
    """'E07985' or 'ses-E07985' -> 'ses-E07985', the session folder's name."""
    session_id = session_id.strip()
    return session_id if session_id.startswith("ses-") else f"ses-{session_id}"


def superior_extent(path: str) -> int:
    """Voxels along the array axis closest to inferior-superior, from the header; 0 if unknown.

    For an axial run this is its slice count, so runs are tried in order of slice count.
    """
    try:
        img = nib.load(path)
        ornt = orientations.io_orientation(img.affine)
    except _HEADER_ERRORS:  # tried last; reading it then reports it as unreadable
        return 0
    axes = [axis for axis, (code, _) in enumerate(ornt) if code == 2]
    return int(img.shape[axes[0]]) if axes and len(img.shape) > axes[0] else 0


def _load(session: _Session) -> dict | str:
    """The record of one session, or why it is skipped (runs in a worker)."""
    if isinstance(session.report, common.Skip):
        return session.report
    if not isinstance(session.report, CleanReport):
        return str(session.report)
    runs = sorted(session.runs, key=lambda p: (-superior_extent(p), p))
    reasons = []
    for path in runs:
        try:
            volume = imaging.prepare_volume(imaging.read_nifti(path), session.volume_shape)
        except imaging.SkipVolume as e:
            reasons.append(common.Skip.of(e))
            continue
        return {
            "volume": volume,
            "report": session.report.text,
            "num_sentences": len(session.report.sentences),
            "labels": np.zeros((0,), np.float32),
            "subject_id": session.subject_id,
            "session_id": session.session_id,
            "id": Path(path).name.removesuffix(".nii.gz"),
        }
    return reasons[0]


def make_builder(config_name: str, data_dir: str, **options: Any) -> BimcvCovid19:
    """A builder for config 'ct' (see OPTIONS; num_workers defaults to the CPU count)."""
    options = common.check_options("bimcv_covid19", options, OPTIONS)
    translations = options.get("translations")
    if translations and not Path(translations).is_file():
        raise common.LayoutError(
            f"translations file {translations} not found; expected a CSV with columns "
            "session_id, text"
        )
    return common.array_record_builder(BimcvCovid19, BimcvConfig, config_name, data_dir, options)
