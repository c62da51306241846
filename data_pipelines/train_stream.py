"""The training stream: prepared ArrayRecord datasets -> tokenised batches, per process.

Everything a batch holds is a pure function of (seed, step), so the stream is deterministic
whatever the number of workers or processes, and its state is just the next step:

  record stream   source k, position j -> epoch j // L_k, record shuffle_{seed,k,epoch}(j % L_k),
                  where L_k drops the last N_k % G records of each epoch (G = global batch);
                  several sources of a modality are interleaved by weight (grain's mix)
  global batch    step s = stream positions [s G, (s + 1) G)
  process slice   process p of P loads rows [p G / P, (p + 1) G / P) of it
  transform       decode, crop (2D, random, seeded by (seed, source, epoch, record)) or
                  HU window (3D), tokenise the reports: `transforms`, the one transform layer;
                  with selection.mode=oracle the volumes' ground-truth `lesion_slices` too
  stream          the 2D and 3D step datasets zipped, prefetched by `worker_count` processes

A record that fails to decode, has the wrong shape, NaN/Inf values or an empty report is
replaced by another record of the same source chosen by a seeded draw, and counted in
`TrainStream.skipped`; every read is counted in `TrainStream.reads`. A source where more than
`config.data.max_failure_fraction` of the reads fail stops the stream (`failure_limit`).

Imports no jax itself; grain does (for its profiler) when jax is installed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from data_pipelines import transforms
from data_pipelines.failure_limit import FailureLimit
from data_pipelines.sources import (
    ARRAY_KEY,
    DataConfigError,
    Source,
    crop_size,
    open_for_config,
    parse_sources,
)
from data_pipelines.worker_flags import ensure_absl_flags_parsed

# Why a record was replaced; TrainStream.skipped counts "<source>: <reason>".
UNDECODABLE = "undecodable record"
BAD_ARRAY = "unexpected array shape or dtype"
NON_FINITE = "NaN or Inf values"
EMPTY_REPORT = "empty report"

MAX_ATTEMPTS = 32  # replacement draws before a source is declared unreadable
_STEPS = 2**40  # length of the (practically infinite) step datasets
_ROWS = 2**50
_MODALITY_ID = {"2d": 0, "3d": 1}
LESION_SLICES = "lesion_slices"  # per-slice ground truth: what oracle slice selection reads


def _epoch_seed(*key: int) -> int:
    """A 32-bit seed for grain's index shuffle, derived from the whole key."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _ShuffledEpochs:
    """Stream position j of one source -> (source, epoch, record index); a new order each epoch."""

    source: int
    size: int  # records in the split
    epoch_length: int  # records used per epoch
    key: tuple[int, ...]  # (seed, modality)

    def __call__(self, j: int) -> tuple[int, int, int]:
        epoch, pos = divmod(int(j), self.epoch_length)
        seed = _epoch_seed(*self.key, self.source, epoch)
        index = grain.experimental.index_shuffle(pos, self.size - 1, seed, 4)
        return self.source, epoch, int(index)


@dataclasses.dataclass(frozen=True)
class _ProcessRows:
    """A global batch of record references -> the rows this process loads."""

    process_index: int
    local_batch: int

    def __call__(self, refs: list) -> list:
        start = self.process_index * self.local_batch
        return refs[start : start + self.local_batch]


class LoadedRecord(NamedTuple):
    array: np.ndarray  # transformed
    report: str
    skipped: list[str]  # "<source>: <reason>" of each record it replaced
    extras: dict[str, np.ndarray]  # the loader's extra fields, as stored


class _RecordLoader:
    """Reads, checks and transforms records; replaces unusable ones by seeded redraws.
    ``extra_fields``: record fields passed on as stored (every source must have them)."""

    def __init__(
        self,
        modality: str,
        sources: Sequence[Source],
        seed: int,
        crop: int,
        window: tuple,
        extra_fields: tuple[str, ...] = (),
    ):
        self.modality = modality
        self.sources = tuple(sources)
        self.seed = seed
        self.crop = crop
        self.window = window
        self.extra_fields = extra_fields
        self._opened: list | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": None}  # readers are reopened in each worker

    def _reader(self, k: int):
        if self._opened is None:
            self._opened = [s.open() for s in self.sources]
        return self._opened[k]

    def __call__(self, ref: tuple[int, int, int]) -> LoadedRecord:
        """The record `ref` or its replacement."""
        k, epoch, index = ref
        source = self.sources[k]
        skipped = []
        for attempt in range(MAX_ATTEMPTS):
            record, report, reason = self._read(k, index)
            if reason is None:
                rng = np.random.default_rng(
                    [self.seed, _MODALITY_ID[self.modality], k, epoch, index]
                )
                array = self._transform(record[ARRAY_KEY[self.modality]], rng)
                extras = {name: np.asarray(record[name]) for name in self.extra_fields}
                return LoadedRecord(array, report, skipped, extras)
            skipped.append(f"{source.name}: {reason}")
            redraw = np.random.default_rng(
                [self.seed, _MODALITY_ID[self.modality], k, epoch, index, attempt, 1]
            )
            index = int(redraw.integers(source.size))
        raise RuntimeError(
            f"{MAX_ATTEMPTS} records in a row of {source.path} (split {source.split}) were "
            f"unusable ({', '.join(sorted(set(skipped)))}): rebuild it with "
            "python -m data_pipelines.prepare"
        )

    def _read(self, k: int, index: int) -> tuple[Any, str, str | None]:
        """(record, report, None) of a usable record, else (None, '', skip reason)."""
        source = self.sources[k]
        try:
            record = self._reader(k)[index]
        except Exception:  # any parse error of a damaged record: skip it, never crash
            return None, "", UNDECODABLE
        array = record.get(ARRAY_KEY[self.modality])
        if (
            not isinstance(array, np.ndarray)
            or array.shape != source.array_shape
            or array.dtype != source.array_dtype
        ):
            return None, "", BAD_ARRAY
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return None, "", NON_FINITE
        report = record.get("report", b"")
        report = report.decode("utf-8", "replace") if isinstance(report, bytes) else str(report)
        if not report.strip():
            return None, "", EMPTY_REPORT
        return record, report, None

    def _transform(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.modality == "2d":
            return transforms.train_transform_2d(array, rng, self.crop)
        return transforms.transform_3d(array, self.window)


@dataclasses.dataclass
class _LoadBatch:
    """Record references of this process -> {image|volume, *_text_ids, *_text_mask} and the
    counts `skipped` ({"<source>: <reason>": n}) and `reads` ({"<source>": n})."""

    loader: _RecordLoader
    tokenizer: Any
    max_length: int

    def __call__(self, refs: list) -> dict:
        rows = [self.loader(ref) for ref in refs]
        prefix = ARRAY_KEY[self.loader.modality]
        reads: Counter[str] = Counter()
        for (k, _, _), row in zip(refs, rows, strict=True):
            reads[self.loader.sources[k].name] += 1 + len(row.skipped)  # the replaced ones too
        return {
            prefix: np.stack([row.array for row in rows]),
            **{
                name: np.stack([row.extras[name] for row in rows])
                for name in self.loader.extra_fields
            },
            **transforms.tokenize(
                [row.report for row in rows], self.tokenizer, self.max_length, prefix
            ),
            "skipped": dict(Counter(label for row in rows for label in row.skipped)),
            "reads": dict(reads),
        }


_COUNTS = ("skipped", "reads")


def _merge_steps(parts: dict | tuple[dict, ...]) -> dict:
    """Zip the per-modality batches of one step into one dict; skip and read counts add up."""
    if isinstance(parts, dict):
        parts = (parts,)
    merged: dict = {}
    counts: dict[str, Counter[str]] = {name: Counter() for name in _COUNTS}
    for part in parts:
        for name in _COUNTS:
            counts[name].update(part[name])
        merged.update({k: v for k, v in part.items() if k not in _COUNTS})
    merged.update({name: dict(counter) for name, counter in counts.items()})
    return merged


@dataclasses.dataclass(frozen=True)
class _ModalityPlan:
    modality: str
    sources: tuple[Source, ...]
    global_batch: int
    local_batch: int

    @property
    def epoch_lengths(self) -> list[int]:
        return [s.size - s.size % self.global_batch for s in self.sources]

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.epoch_lengths) // self.global_batch


def _plan(config, modality: str, process_count: int) -> _ModalityPlan | None:
    entries = parse_sources(config.data[f"sources_{modality}"])
    if not entries:
        return None
    field = f"config.batch.size_{modality}"
    global_batch = int(config.batch[f"size_{modality}"])
    if global_batch <= 0 or global_batch % process_count:
        raise DataConfigError(
            f"{field}={global_batch} must be positive and divisible by the {process_count} "
            f"processes (config.data.sources_{modality} is set)"
        )
    sources = tuple(
        open_for_config(config, name, modality, "train", weight) for name, weight in entries
    )
    for source in sources:
        if source.size < global_batch:
            raise DataConfigError(
                f"{source.name} has {source.size} training records in {source.path}, fewer "
                f"than one global batch ({field}={global_batch})"
            )
    return _ModalityPlan(modality, sources, global_batch, global_batch // process_count)


def _extra_fields(config, plan: _ModalityPlan) -> tuple[str, ...]:
    """The fields beyond array and report that the step reads: the volumes' ground-truth
    lesion slices under selection.mode=oracle, which only the phantoms store."""
    if plan.modality != "3d" or config.selection.mode != "oracle":
        return ()
    for source in plan.sources:
        if LESION_SLICES not in source.fields:
            raise DataConfigError(
                f"config.selection.mode=oracle picks slices by their ground-truth lesions, "
                f"which {source.name} in {source.path} does not store ({LESION_SLICES}); "
                "only the phantoms have them: use selection.mode=attentive or random"
            )
    return (LESION_SLICES,)


def _step_dataset(plan: _ModalityPlan, config, tokenizer, process_index: int) -> grain.MapDataset:
    """Step s -> this process's slice of global batch s of one modality."""
    key = (int(config.seed), _MODALITY_ID[plan.modality])
    streams = [
        grain.MapDataset.range(_ROWS).map(_ShuffledEpochs(k, s.size, length, key))
        for k, (s, length) in enumerate(zip(plan.sources, plan.epoch_lengths, strict=True))
    ]
    if len(streams) == 1:
        refs = streams[0]
    else:
        refs = grain.MapDataset.mix(streams, [s.weight for s in plan.sources])
    loader = _RecordLoader(
        plan.modality,
        plan.sources,
        int(config.seed),
        crop_size(config),
        tuple(float(v) for v in config.data.hu_window),
        _extra_fields(config, plan),
    )
    return (
        refs.batch(plan.global_batch, drop_remainder=True, batch_fn=list)
        .map(_ProcessRows(process_index, plan.local_batch))
        .map(_LoadBatch(loader, tokenizer, int(config.text.max_length)))
        .slice(slice(0, _STEPS))
    )


class TrainStream:
    """Infinite training batches of this process: its slice of each global batch.

    Reads config.seed, config.data.{data_dir, sources_2d, sources_3d, worker_count, hu_window},
    config.batch.size_{2d,3d} (global), config.model.{image_size, volume_size},
    config.text.max_length and config.selection.mode. `steps_per_epoch` counts the batches of
    one pass over the 2D training records (3D without a 2D source). `skipped` counts replaced
    records as {"<source>: <reason>": n}, `reads` the records read per source (replaced ones
    included); once a source's failures pass config.data.max_failure_fraction of its reads
    (judged after 100 reads), `next` raises TooManyFailuresError. `get_state()` is the next
    step (plus the counts); restoring it on a fresh stream, with any number of workers or
    processes, continues with the very batches the saved stream would have produced.
    """

    def __init__(self, config, tokenizer, process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        plans = [_plan(config, m, process_count) for m in ("2d", "3d")]
        plans = [p for p in plans if p is not None]
        if not plans:
            raise DataConfigError(
                "config.data.sources_2d and config.data.sources_3d are both empty"
            )
        self.steps_per_epoch = plans[0].steps_per_epoch
        parts = [_step_dataset(p, config, tokenizer, process_index) for p in plans]
        self._steps = (
            parts[0] if len(parts) == 1 else grain.experimental.ZipMapDataset(parts)
        ).map(_merge_steps)
        self._workers = int(config.data.worker_count)
        self._step = 0
        self._iterator: Iterator | None = None
        self._limit = FailureLimit(float(config.data.max_failure_fraction))
        self._data_dir = config.data.data_dir
        self.skipped: Counter[str] = Counter()
        self.reads: Counter[str] = Counter()

    def _start(self) -> Iterator:
        threads = 2 if self._workers == 0 else 1
        ds = self._steps.slice(slice(self._step, None)).to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2)
        )
        if self._workers > 0:
            ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=2)
            )
        return iter(ds)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = dict(next(self._iterator))
        self.skipped.update(batch.pop("skipped"))
        self.reads.update(batch.pop("reads"))
        self._check_failures()
        if self._workers > 0:
            # Own the arrays: grain's shared-memory blocks are then freed at once, not when
            # the caller drops the batch (perhaps only at interpreter exit).
            batch = {k: np.array(v) for k, v in batch.items()}
        self._step += 1
        return batch

    def _check_failures(self) -> None:
        for source, seen in self.reads.items():
            prefix = f"{source}: "
            failures = {
                label.removeprefix(prefix): n
                for label, n in self.skipped.items()
                if label.startswith(prefix)
            }
            self._limit.check(
                f"{source} in {self._data_dir}",
                failures,
                seen,
                f"Rebuild it with python -m data_pipelines.prepare {source.split('/')[0]}, or "
                "raise config.data.max_failure_fraction to train on the rest.",
            )

    def skip_metrics(self) -> dict[str, int]:
        """Replaced records so far, in total and per "<source>: <reason>", for metrics.jsonl."""
        return {
            "data_skipped": sum(self.skipped.values()),
            **{f"data_skipped/{label}": n for label, n in sorted(self.skipped.items())},
        }

    def get_state(self) -> dict:
        return {"step": self._step, "skipped": dict(self.skipped), "reads": dict(self.reads)}

    def set_state(self, state: dict) -> None:
        self.close()
        self._step = int(state["step"])
        self.skipped = Counter(state.get("skipped", {}))
        self.reads = Counter(state.get("reads", {}))

    def close(self) -> None:
        """Stop the worker processes (also done when the stream is garbage collected)."""
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
            self._iterator = None
