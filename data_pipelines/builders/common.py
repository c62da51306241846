"""What the real-dataset builders share: layout checks, tables, subject splits, the build loop.

Each real builder turns one input (an image, a CT session, a volume) into either a record or a
skip reason, in a pure function of a picklable task. `generate` runs that function over a split,
in worker processes when asked, keeps the records in input order and stores the skip counts in
`metadata.json`, so a build always says how much it dropped and why.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

MISSING_IMAGE = "missing image"
MISSING_VOLUME = "missing volume"


class LayoutError(ValueError):
    """The manual_dir given to a real dataset lacks a file or folder the builder needs."""


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

    The columns must all be there (checked when iteration starts).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, restval="")
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
    ordered = sorted(set(groups))
    if len(ordered) <= len(held_out):
        raise ValueError(
            f"only {len(ordered)} subjects: need more than {len(held_out)} to hold out "
            f"{', '.join(held_out)} by subject"
        )
    order = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    assignment, start = {}, 0
    for split, fraction in held_out.items():
        count = max(1, round(fraction * len(ordered)))
        assignment.update((group, split) for group in order[start : start + count])
        start += count
    assignment.update((group, "train") for group in order[start:])
    return assignment


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


def generate(
    builder: tfds.core.GeneratorBasedBuilder,
    split: str,
    tasks: Sequence[Any],
    work: Callable[[Any], dict | str],
    chunksize: int = 1,
) -> Iterator[tuple[int, dict]]:
    """Yield (index, record) for the tasks that give records; count the others by reason.

    The counts go to the builder's metadata (`skipped[split]`). A split that keeps nothing is
    an error that lists why every input was dropped (TFDS would fail on it less clearly).
    """
    skipped: Counter[str] = Counter()
    kept = 0
    workers = builder.builder_config.num_workers
    for result in parallel_map(work, tasks, workers, chunksize):
        if isinstance(result, str):
            skipped[result] += 1
            continue
        yield kept, result
        kept += 1
    builder.info.metadata["skipped"][split] = dict(skipped)
    if not kept:
        raise ValueError(
            f"{builder.name}: split {split!r} kept none of its {len(tasks)} inputs "
            f"(skipped: {dict(skipped) or 'none'})"
        )


def recorded_options(config: Any, names: Sequence[str]) -> dict[str, Any]:
    """The config options that define the stored data, JSON-ready (tuples become lists)."""
    values = dataclasses.asdict(config)
    return {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in names}


def check_options(dataset: str, options: Mapping[str, Any], valid: Sequence[str]) -> dict:
    """Options with known names only; volume_shape as a tuple of ints; num_workers (where it
    is an option) defaulting to the CPU count."""
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{dataset}: unknown options {unknown}; valid: {list(valid)}")
    options = dict(options)
    if options.get("volume_shape") is not None:
        options["volume_shape"] = tuple(int(n) for n in options["volume_shape"])
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
