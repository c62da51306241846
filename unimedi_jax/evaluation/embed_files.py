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
import itertools
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data_pipelines import imaging, transforms
from unimedi_jax.evaluation.trained_model import UniMedIInference


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
    model: UniMedIInference,
    paths: Sequence[str | Path],
    intensity: str = imaging.AUTO,
    workers: int = 0,
    progress: Callable[[str], None] | None = None,
    every_s: float = 10.0,
) -> Embedded:
    """Reads (with the run's preprocessing) and embeds every input under ``paths``, a batch of
    ``model.batch_size`` at a time per kind; unreadable inputs go to ``failed``. ``intensity``:
    what CT values are (``imaging.as_hounsfield``).

    ``workers`` > 0 decodes files in that many processes (numpy only: no jax in them), up to
    two batches ahead, while this process embeds the batch before. ``progress`` gets a line
    (done/total, files/s, ETA) at most every ``every_s`` seconds, and a last one.
    """
    inputs, failed, skipped = collect_inputs(paths)
    preprocessing = model.preprocessing
    first_image = next((path for path, kind in inputs if kind == imaging.IMAGE), None)
    if first_image is not None and preprocessing.image_stored_size is None:
        model.read_image(first_image)  # the ConfigError of a run without X-rays, before work
    embedders = {imaging.IMAGE: model.embed_images, imaging.VOLUME: model.embed_volumes}
    meter = _Progress(len(inputs), progress, every_s)
    done: dict[int, np.ndarray] = {}
    notes = []
    pool = _reader_pool(workers) if workers > 0 and inputs else None
    try:
        for kind in (imaging.IMAGE, imaging.VOLUME):
            indices = [i for i, (_, input_kind) in enumerate(inputs) if input_kind == kind]
            reads = _reads(pool, preprocessing, kind, [inputs[i][0] for i in indices], intensity)
            pending: list[tuple[int, np.ndarray]] = []
            for index, (array, error, lines) in zip(indices, reads, strict=True):
                path = inputs[index][0]
                notes += [(path, line) for line in lines]
                if error is not None:
                    failed.append((path, error))
                    meter.advance(1)
                else:
                    pending.append((index, array))
                if len(pending) == model.batch_size:
                    done.update(_embed(embedders[kind], pending))
                    meter.advance(len(pending))
                    pending = []
            done.update(_embed(embedders[kind], pending))
            meter.advance(len(pending))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    meter.finish()
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


def _reader_pool(workers: int) -> Executor:
    """Reader processes from a fork server that imported only the numpy readers: a fork of
    this process would copy JAX's threads, a spawn would re-import the command (and JAX)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_pipelines.transforms"])
    return ProcessPoolExecutor(workers, mp_context=context)


def _reads(
    pool: Executor | None,
    preprocessing: transforms.FilePreprocessing,
    kind: str,
    paths: Sequence[str],
    intensity: str,
    ahead: int = 32,
) -> Iterator[tuple[np.ndarray | None, str | None, list[str]]]:
    """``transforms.read_file`` of each path, in order: here, or in ``pool`` with up to
    ``ahead`` files submitted beyond the one being yielded."""
    if pool is None:
        for path in paths:
            yield transforms.read_file(preprocessing, kind, path, intensity)
        return
    submit = lambda path: pool.submit(transforms.read_file, preprocessing, kind, path, intensity)
    todo = iter(paths)
    futures = collections.deque(submit(path) for path in itertools.islice(todo, ahead))
    while futures:
        result = futures.popleft().result()
        futures.extend(submit(path) for path in itertools.islice(todo, 1))
        yield result


class _Progress:
    """``done/total inputs, files/s, ETA`` lines to ``out``, one per ``every_s`` at most."""

    def __init__(self, total: int, out: Callable[[str], None] | None, every_s: float):
        self.total, self.out, self.every_s = total, out, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        if self.out is not None and time.monotonic() - self.last >= self.every_s:
            self.out(self.line())
            self.last = time.monotonic()

    def finish(self) -> None:
        if self.out is not None and self.total:
            self.out(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (
            f"read and embedded {self.done}/{self.total} inputs, {rate:.1f} files/s, "
            f"ETA {_duration(eta)}"
        )


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


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
