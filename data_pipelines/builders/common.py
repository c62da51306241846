"""What the real-dataset builders share: layout checks, tables, subject splits, the build loop.

Each real builder turns one input (an image, a CT session, a volume) into either a record or a
skip reason, in a pure function of a picklable task. `generate` runs that function over a split,
in worker processes when asked, keeps the records in input order and stores the skip counts in
`metadata.json`, so a build always says how much it dropped and why. A skip reason that is a
`Skip` also names its file (or table row); the first few of those per reason are stored too.
Paths built from a table's fields go through `within`, so a row cannot make a build read a file
outside manual_dir.

The labelled evaluation datasets (CheXpert, RSNA Pneumonia, COVIDx, CC-CCII, LUNA16) subclass
`EvalBuilder`: their records carry the label a linear probe reads as is (`label_features`) and
their `metadata.json` names the task and the classes.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import csv
import dataclasses
import gzip
import math
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import imaging
from data_pipelines.failure_limit import FailureLimit
from data_pipelines.reports import SkipReason
from unimedi_jax.core.errors import UserError

MISSING_IMAGE = "missing image"
MISSING_VOLUME = "missing volume"
PATH_OUTSIDE = "path outside manual_dir"
UNREADABLE_REPORT = "unreadable report"
# How many files `generate` stores per split and reason (metadata `skipped_files`).
LISTED_SKIPS = 20
# Skips that mean a damaged input, unlike filters (a lateral view, a short report, a sagittal
# series): a split where too many inputs fail so stops the build (see `failure_limit`).
FAILURE_REASONS = frozenset(
    {
        imaging.UNREADABLE,
        imaging.NO_PIXEL_DATA,
        imaging.ABSURD_SIZE,
        imaging.NAN_VOXELS,
        imaging.BAD_AFFINE,
        imaging.INCONSISTENT_SERIES,
        imaging.CONSTANT,
        MISSING_IMAGE,
        MISSING_VOLUME,
        PATH_OUTSIDE,
        UNREADABLE_REPORT,
        SkipReason.MISSING,
        SkipReason.EMPTY,
        SkipReason.UNPARSEABLE,
    }
)
_FAILURE_LIMIT: contextvars.ContextVar[FailureLimit | None] = contextvars.ContextVar(
    "failure_limit", default=None
)
# What a linear probe fits (unimedi_jax.evaluation.linear_probe.TASKS).
TASKS = ("multilabel", "binary", "multiclass")


class LayoutError(UserError, ValueError):
    """The manual_dir given to a real dataset lacks a file or folder the builder needs."""


class Skip(str):
    """A skip reason (the string, what `generate` counts) that also names where it happened:
    the file, or the table, line and field of a bad row.

    A str, so code that counts or compares reasons takes it as the plain reason.
    """

    file: str

    def __new__(cls, reason: str, file: str | os.PathLike[str]) -> Skip:
        skip = super().__new__(cls, reason)
        skip.file = str(file)
        return skip

    def __reduce__(self) -> tuple:  # pickled to and from worker processes
        return Skip, (str(self), self.file)

    @classmethod
    def of(cls, error: imaging.SkipImage) -> Skip:
        """The skip a reader's SkipImage / SkipVolume stands for, with its file and detail."""
        return cls(error.reason, error.path + (f" ({error.detail})" if error.detail else ""))


def within(root: str | os.PathLike[str], *parts: str) -> Path | None:
    """`root` joined with `parts` (fields read from the dataset's tables), normalised; None
    when that path leaves `root`: a part is absolute, or its `..` steps climb out.

    Judged on the text alone, not on where symlinks lead, so a symlink placed inside the
    folder keeps working wherever it points. The result has its `..` steps removed, so the
    file opened is the one judged.
    """
    base = os.path.normpath(root)
    if any(os.path.isabs(part) for part in parts):
        return None
    joined = os.path.normpath(os.path.join(base, *parts))
    if joined != base and not joined.startswith(os.path.join(base, "")):
        return None
    return Path(joined)


@contextlib.contextmanager
def utf8(path: str | os.PathLike[str], where: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn a UnicodeDecodeError inside the block into a LayoutError naming `path` (and
    `where()`, e.g. the last line read): for the tables a whole build depends on."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise LayoutError(
            f"{path} is not UTF-8 text{where()} (byte 0x{e.object[e.start]:02x}); save it as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8) and rerun"
        ) from e


def require(path: Path, root: str | Path, layout: str) -> Path:
    """`path` if it exists; else a LayoutError naming it, the root and the expected layout."""
    if not Path(root).is_dir():
        raise LayoutError(f"manual_dir {root} does not exist; expected {layout}")
    if not path.exists():
        name = path.relative_to(root) if path.is_relative_to(root) else path
        raise LayoutError(f"{name} not found in {root}; expected {layout}")
    return path


def read_table(
    path: Path, columns: Sequence[str], delimiter: str = ","
) -> Iterator[dict[str, str]]:
    """Rows of a CSV/TSV (gzip when the name ends in .gz), streamed: MIMIC's metadata has 377k.

    The columns must all be there (checked when iteration starts); text that is not UTF-8 is
    a LayoutError naming the file and the line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, restval="")
        with utf8(path, lambda: f" after line {reader.line_num}"):
            found = list(reader.fieldnames or [])
            missing = [c for c in columns if c not in found]
            if missing:
                raise LayoutError(
                    f"{path} has no column {', '.join(missing)}; columns found: "
                    f"{', '.join(found) or 'none (empty file)'}"
                )
            yield from reader


def parse_float(cell: str | None) -> float:
    """A table cell as a float; blank cells (and NaN spellings) are NaN."""
    try:
        return float(cell) if cell and cell.strip() else math.nan
    except ValueError:
        return math.nan


def split_groups(groups: Iterable[str], held_out: Mapping[str, float], seed: int) -> dict[str, str]:
    """Group (subject, patient) -> split: seeded held-out fractions, the rest 'train'.

    Groups are sorted, then permuted by `seed`, so the assignment depends only on the seed and
    the set of groups. Each held-out split gets round(fraction * n) groups, at least one.
    """
    order = seeded_order(groups, seed)
    if len(order) <= len(held_out):
        raise ValueError(
            f"only {len(order)} subjects: need more than {len(held_out)} to hold out "
            f"{', '.join(held_out)} by subject"
        )
    assignment, start = {}, 0
    for split, fraction in held_out.items():
        count = max(1, round(fraction * len(order)))
        assignment.update((group, split) for group in order[start : start + count])
        start += count
    assignment.update((group, "train") for group in order[start:])
    return assignment


def seeded_order(groups: Iterable[str], seed: int) -> list[str]:
    """The distinct groups, sorted, then permuted by `seed`: the order depends only on the seed
    and the set of groups (not on the order they were read in)."""
    ordered = sorted(set(groups))
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def parallel_map(
    fn: Callable[[Any], Any], items: Sequence[Any], num_workers: int, chunksize: int = 1
) -> Iterator[Any]:
    """`map(fn, items)` in input order, over `num_workers` spawned processes when above 1.

    Spawned (not forked) workers start clean, whatever threads the parent holds.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield from pool.imap(fn, items, chunksize)


def default_workers() -> int:
    """One worker per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@contextlib.contextmanager
def failure_limit(limit: FailureLimit) -> Iterator[None]:
    """Builds inside the block refuse splits with more failures than `limit` allows (`prepare`
    sets it from --max_failure_fraction; builders run in the calling thread)."""
    token = _FAILURE_LIMIT.set(limit)
    try:
        yield
    finally:
        _FAILURE_LIMIT.reset(token)


def generate(
    builder: tfds.core.GeneratorBasedBuilder,
    split: str,
    tasks: Sequence[Any],
    work: Callable[[Any], dict | str | list[dict | str]],
    chunksize: int = 1,
) -> Iterator[tuple[int, dict]]:
    """Yield (index, record) for the tasks that give records; count the others by reason.

    A task gives a record, a skip reason, or a list of them (an input holding several records,
    e.g. the nodule candidates of one CT); a task that is itself a `Skip` (a table row found
    bad while listing the inputs) is counted as is. The counts go to the builder's metadata
    (`skipped[split]`), and the files of the first LISTED_SKIPS `Skip`s per reason to
    `skipped_files[split]`. A split that keeps nothing is an error that lists why every input
    was dropped (TFDS would fail on it less clearly); so is one where more inputs failed
    (`FAILURE_REASONS`) than the current `failure_limit` allows.
    """
    skipped: Counter[str] = Counter()
    files: dict[str, list[str]] = {}

    def count(reason: str) -> None:
        skipped[str(reason)] += 1
        listed = files.setdefault(str(reason), [])
        if isinstance(reason, Skip) and len(listed) < LISTED_SKIPS and reason.file not in listed:
            listed.append(reason.file)  # once: a CT's candidates share its skip

    for task in tasks:
        if isinstance(task, Skip):
            count(task)
    todo = [task for task in tasks if not isinstance(task, Skip)]
    kept = 0
    workers = builder.builder_config.num_workers
    for result in parallel_map(work, todo, workers, chunksize):
        for item in result if isinstance(result, list) else [result]:
            if isinstance(item, str):
                count(item)
                continue
            yield kept, item
            kept += 1
    builder.info.metadata["skipped"][split] = dict(skipped)
    builder.info.metadata.setdefault("skipped_files", {})[split] = {
        reason: listed for reason, listed in files.items() if listed
    }
    if not kept:
        raise ValueError(
            f"{builder.name}: split {split!r} kept none of its {len(tasks)} inputs "
            f"(skipped: {dict(skipped) or 'none'})"
        )
    failures = {reason: n for reason, n in skipped.items() if reason in FAILURE_REASONS}
    first = "; ".join(f"{r}: {files[r][0]}" for r in sorted(failures) if files.get(r))
    (_FAILURE_LIMIT.get() or FailureLimit()).check(
        f"{builder.name}: split {split!r}",
        failures,
        kept + sum(skipped.values()),
        (f"First of them: {first}. " if first else "")
        + "Check the raw files (a partial download, a wrong --manual_dir?) or, to build from "
        "the rest anyway, raise --max_failure_fraction.",
    )


def recorded_options(config: Any, names: Sequence[str]) -> dict[str, Any]:
    """The config options that define the stored data, JSON-ready (tuples become lists)."""
    values = dataclasses.asdict(config)
    return {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in names}


def check_options(dataset: str, options: Mapping[str, Any], valid: Sequence[str]) -> dict:
    """Options with known names only; sequences (volume_shape, ...) as tuples of ints;
    num_workers (where it is an option) defaulting to the CPU count."""
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{dataset}: unknown options {unknown}; valid: {list(valid)}")
    options = dict(options)
    for key, value in options.items():
        if isinstance(value, list | tuple):
            if not all(float(n).is_integer() for n in value):
                raise ValueError(f"{dataset}: option {key}={value} must hold integers")
            options[key] = tuple(int(float(n)) for n in value)
    if "num_workers" in valid and options.get("num_workers") is None:
        options["num_workers"] = default_workers()
    return options


def array_record_builder(
    builder: type[tfds.core.GeneratorBasedBuilder],
    config: type[tfds.core.BuilderConfig],
    config_name: str,
    data_dir: str,
    options: Mapping[str, Any],
) -> tfds.core.GeneratorBasedBuilder:
    """`builder` for config `config_name` (at the builder's version) with `options`, writing
    ArrayRecord files under `data_dir`."""
    cfg = config(name=config_name, version=str(builder.VERSION), **options)
    return builder(config=cfg, data_dir=data_dir, file_format="array_record")


def raw_array(shape: Sequence[int], dtype: type) -> tfds.features.Tensor:
    """An array feature stored as raw bytes: decoding a record is a memcpy."""
    return tfds.features.Tensor(
        shape=tuple(shape), dtype=dtype, encoding=tfds.features.Encoding.BYTES
    )


def report_features(num_labels: int) -> dict[str, tfds.features.FeatureConnector]:
    """The cleaned report, its sentence count and a float32 vector of `num_labels` labels."""
    return {
        "report": tfds.features.Text(),
        "num_sentences": tfds.features.Scalar(dtype=np.int32),
        "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.float32),
    }


def dataset_info(
    builder: tfds.core.GeneratorBasedBuilder,
    doc: str,
    features: Mapping[str, Any],
    recorded: Sequence[str],
    **metadata: Any,
) -> tfds.core.DatasetInfo:
    """The DatasetInfo of a builder here: its features and `metadata.json`.

    The description is the first paragraph of `doc` (the builder module's docstring). Records
    are stored in the order they are generated (no shuffling on write). The metadata holds
    `options` (the config's `recorded` options), then `metadata`, then `skipped`, which starts
    empty and is filled per split as the build drops inputs (see `generate`).
    """
    return tfds.core.DatasetInfo(
        builder=builder,
        description=doc.split("\n\n")[0],
        features=tfds.features.FeaturesDict(dict(features)),
        metadata=tfds.core.MetadataDict(
            options=recorded_options(builder.builder_config, recorded), **metadata, skipped={}
        ),
        disable_shuffling=True,
    )


# ---------------------------------------------------------------------------------------------
# Labelled evaluation datasets


def load_image(path: str | Path) -> np.ndarray | Skip:
    """A 2D image (JPEG, PNG or DICOM) as read, uint8; or why it is skipped (missing image,
    unreadable file, ...), naming the file."""
    if not Path(path).is_file():
        return Skip(MISSING_IMAGE, path)
    try:
        return imaging.read_image_2d(path)
    except imaging.SkipImage as e:
        return Skip.of(e)


def load_xray(path: str | Path, size: int) -> np.ndarray | Skip:
    """An X-ray as read (uint8, before `imaging.letterbox`) if it is worth storing at `size`;
    else why not: `load_image`'s reasons, or `imaging.check_xray`'s (too small for the
    training crop, which is at most `size`; a constant image)."""
    pixels = load_image(path)
    if isinstance(pixels, Skip):
        return pixels
    try:
        imaging.check_xray(pixels, path, min(imaging.MIN_XRAY_SIDE, size))
    except imaging.SkipImage as e:
        return Skip.of(e)
    return pixels


def label_features(task: str, classes: Sequence[str]) -> dict[str, tfds.features.FeatureConnector]:
    """The label a linear probe takes as is: `labels`, float32 multi-hot [C], for 'multilabel';
    `label`, an int64 class index (0/1 for 'binary'), for 'binary' and 'multiclass'."""
    if task == "multilabel":
        return {"labels": tfds.features.Tensor(shape=(len(classes),), dtype=np.float32)}
    if task in ("binary", "multiclass"):
        return {"label": tfds.features.ClassLabel(names=list(classes))}
    raise ValueError(f"unknown task {task!r}; valid: {TASKS}")


@dataclasses.dataclass(kw_only=True)
class EvalConfig(tfds.core.BuilderConfig):
    """What every evaluation dataset takes: the split seed and the reader processes."""

    seed: int = 0
    num_workers: int = 0


@dataclasses.dataclass(kw_only=True)
class EvalImageConfig(EvalConfig):
    """An evaluation dataset of X-rays, letterboxed to `image_size` like pre-training's."""

    image_size: int = 256


@dataclasses.dataclass(kw_only=True)
class EvalVolumeConfig(EvalConfig):
    """An evaluation dataset of CT volumes, stored at `volume_shape` like pre-training's."""

    volume_shape: tuple[int, int, int] = (32, 128, 128)


class EvalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A labelled evaluation dataset read from manual_dir (CheXpert, RSNA Pneumonia, ...).

    The subclass's module is the dataset: its name is the builder's, and it defines VERSION,
    TASK and CLASS_NAMES (what a probe config reads), LAYOUT (the expected manual_dir, for
    error messages) and a docstring that describes the data. A record holds the stored array
    (`image` uint8 [S, S] under an EvalImageConfig, `volume` int16 [D, H, W] under an
    EvalVolumeConfig), the label (`label_features`), the TEXT fields and `_features()`. The
    subclass gives the inputs of each split and `load`, which turns one input into a record, a
    skip reason or a list of them. The subclasses stay out of TFDS's name registry: TFDS ships
    a `chexpert` builder of its own, and these are only ever opened from their directory.
    """

    RECORDED: ClassVar[tuple[str, ...]]  # the config options that change what is stored
    TEXT: ClassVar[tuple[str, ...]] = ("patient_id", "id")  # text features of a record
    CHUNKSIZE: ClassVar[int] = 1  # inputs handed to a worker at a time

    def __init_subclass__(cls, **kwargs: Any):
        module = sys.modules[cls.__module__]
        cls.name = cls.__module__.rsplit(".", 1)[-1]
        cls.VERSION = tfds.core.Version(module.VERSION)
        cls.MANUAL_DOWNLOAD_INSTRUCTIONS = (
            f"Point manual_dir at {module.LAYOUT} (see docs/data.md)."
        )
        super().__init_subclass__(**{**kwargs, "skip_registration": True})

    def _features(self) -> dict[str, Any]:
        """The features of a record besides its array, label and TEXT fields."""
        return {}

    @abc.abstractmethod
    def _inputs(self, root: Path) -> dict[str, Sequence[Any]]:
        """Split -> the picklable inputs of `load`, after checking the layout of `root`."""

    @staticmethod
    @abc.abstractmethod
    def load(item: Any) -> dict | str | list[dict | str]:
        """One input -> its record(s) or skip reason(s); runs in a worker."""

    def _info(self) -> tfds.core.DatasetInfo:
        module = sys.modules[type(self).__module__]
        cfg = self.builder_config
        if isinstance(cfg, EvalImageConfig):
            array = {"image": raw_array((cfg.image_size, cfg.image_size), np.uint8)}
        else:
            array = {"volume": raw_array(cfg.volume_shape, np.int16)}
        features = {
            **array,
            **label_features(module.TASK, module.CLASS_NAMES),
            **{key: tfds.features.Text() for key in self.TEXT},
            **self._features(),
        }
        return dataset_info(
            self,
            module.__doc__ or "",
            features,
            self.RECORDED,
            task=module.TASK,
            classes=list(module.CLASS_NAMES),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        inputs = self._inputs(Path(dl_manager.manual_dir))
        return {split: self._generate_examples(split, items) for split, items in inputs.items()}

    def _generate_examples(self, split: str, items: Sequence[Any]) -> Iterator[tuple[int, dict]]:
        return generate(self, split, items, self.load, self.CHUNKSIZE)
