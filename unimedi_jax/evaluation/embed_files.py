"""Files and folders on disk -> embeddings, and each against report texts: the library of
``python -m unimedi_jax.embed``.

Each path is an X-ray or a CT by what it is (``imaging.input_kind``); a folder that is not a
DICOM series is walked, and the files in it that are neither (CSV, text, DICOMDIR indexes) are
skipped and counted. An input that cannot be read is listed with the reason and the others are
embedded, so one bad file in a thousand does not cost the run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines import imaging
from unimedi_jax.core.errors import UserError
from unimedi_jax.inference import UniMedIInference


@dataclasses.dataclass
class Embedded:
    """Embeddings [N, E] of the inputs that read, in the order given, with what failed."""

    paths: list[str]
    kinds: list[str]  # imaging.IMAGE or imaging.VOLUME
    embeddings: np.ndarray
    failed: list[tuple[str, str]]  # (path, reason)
    notes: list[tuple[str, str]]  # (path, warning) of inputs read with a warning
    skipped: list[str] = dataclasses.field(default_factory=list)  # walked files of no input kind

    def save(self, out: str | Path, texts: Sequence[str] = (), similarity=None) -> None:
        """An .npz of plain arrays (``np.load(out, allow_pickle=False)`` reads it): embeddings,
        paths, kinds, failed_paths, failed_reasons, and with ``texts`` their ``similarity``."""
        extra = {}
        if texts:
            extra = {"texts": np.array(list(texts), dtype=str), "similarity": similarity}
        np.savez(
            out,
            embeddings=self.embeddings,
            paths=np.array(self.paths, dtype=str),
            kinds=np.array(self.kinds, dtype=str),
            failed_paths=np.array([path for path, _ in self.failed], dtype=str),
            failed_reasons=np.array([reason for _, reason in self.failed], dtype=str),
            **extra,
        )


def collect_inputs(
    paths: Sequence[str | Path], walked: bool = False
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """([(path, kind)], [(path, reason)], [skipped path]): every image and volume under
    ``paths``, folders that are not a DICOM series walked in name order. A file found in a walk
    that is neither an image nor a volume is skipped; one given by name is a failure, as is a
    path that does not exist."""
    found, failed, skipped = [], [], []
    for path in paths:
        try:
            kind = imaging.input_kind(path)
        except FileNotFoundError as err:
            failed.append((str(path), str(err)))
            continue
        if kind == imaging.FOLDER:
            inner = collect_inputs(sorted(Path(path).iterdir()), walked=True)
            found += inner[0]
            failed += inner[1]
            skipped += inner[2]
        elif kind == imaging.OTHER and walked:
            skipped.append(str(path))
        elif kind == imaging.OTHER:
            failed.append((str(path), NOT_AN_INPUT))
        else:
            found.append((str(path), kind))
    return found, failed, skipped


NOT_AN_INPUT = (
    "neither an image nor a volume by its name and content: give PNG, JPEG or DICOM X-rays, "
    "NIfTI or DICOM CTs"
)


def skipped_line(skipped: Sequence[str]) -> str:
    """One line for the files a walk skipped, counted by suffix (or name, without one)."""
    kinds = collections.Counter(Path(p).suffix.lower() or Path(p).name for p in skipped)
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    return (
        f"skipped {len(skipped)} files that are neither images nor volumes by name and "
        f"content ({counts})"
    )


def embed_files(
    model: UniMedIInference, paths: Sequence[str | Path], intensity: str = imaging.AUTO
) -> Embedded:
    """Reads (with the run's preprocessing) and embeds every input under ``paths``, a batch of
    ``model.batch_size`` at a time per kind; unreadable inputs go to ``failed``. ``intensity``:
    what CT values are (``imaging.as_hounsfield``)."""
    inputs, failed, skipped = collect_inputs(paths)
    read_volume = functools.partial(model.read_volume, intensity=intensity)
    readers = {imaging.IMAGE: model.read_image, imaging.VOLUME: read_volume}
    embedders = {imaging.IMAGE: model.embed_images, imaging.VOLUME: model.embed_volumes}
    done: dict[int, np.ndarray] = {}
    notes = []
    for kind in (imaging.IMAGE, imaging.VOLUME):
        pending: list[tuple[int, np.ndarray]] = []
        for index, (path, input_kind) in enumerate(inputs):
            if input_kind != kind:
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", imaging.ReadWarning)
                try:
                    pending.append((index, readers[kind](path)[0]))
                except UserError as err:
                    failed.append((path, str(err)))
            notes += [(path, str(w.message)) for w in caught]
            if len(pending) == model.batch_size:
                done.update(_embed(embedders[kind], pending))
                pending = []
        done.update(_embed(embedders[kind], pending))
    order = sorted(done)
    width = next(iter(done.values())).shape[0] if done else 0
    return Embedded(
        paths=[inputs[i][0] for i in order],
        kinds=[inputs[i][1] for i in order],
        embeddings=np.stack([done[i] for i in order]) if done else np.zeros((0, width)),
        failed=failed,
        notes=notes,
        skipped=skipped,
    )


def _embed(embed, pending: list[tuple[int, np.ndarray]]) -> dict[int, np.ndarray]:
    if not pending:
        return {}
    rows = embed(np.stack([array for _, array in pending]))
    return {index: row for (index, _), row in zip(pending, rows, strict=True)}


def zero_shot_table(embedded: Embedded, texts: Sequence[str], similarity: np.ndarray) -> str:
    """A plain-text table: each input (row) against each text (column), cosine similarity of
    the L2-normalised embeddings, the highest of each row marked with *."""
    headers = [f"T{j + 1}" for j in range(len(texts))]
    lines = ["zero-shot: cosine similarity of each input (row) with each text (column)"]
    lines += [f"  T{j + 1} = {text}" for j, text in enumerate(texts)]
    name_width = max(len(path) for path in embedded.paths)
    lines.append(f"{'input':<{name_width}}  {'kind':<6}  " + "  ".join(f"{h:>7}" for h in headers))
    for path, kind, row in zip(embedded.paths, embedded.kinds, similarity, strict=True):
        best = int(np.argmax(row))
        cells = [f"{v:+.4f}{'*' if j == best else ' '}" for j, v in enumerate(row)]
        lines.append(f"{path:<{name_width}}  {kind:<6}  " + "  ".join(cells))
    return "\n".join(lines)
