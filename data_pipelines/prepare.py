"""Build datasets into ArrayRecord files once, before training.

    python -m data_pipelines.prepare phantoms --data_dir=DIR --image_size=64 --volume_shape=16,64,64
    python -m data_pipelines.prepare NAME --data_dir=DIR --manual_dir=RAW_FILES

Builds every config of NAME (or only NAME/CONFIG), shows TFDS's progress bars and ends with the
records kept per split and the inputs skipped per reason, with the first files of each.
`ensure_prepared` is the same from Python, for the demo: it builds only what is missing and
refuses data built at other sizes.

Run it from one process: TFDS writes into a temporary directory and renames it when done, but two
processes building the same dataset at once would race on that rename.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import app, flags

from data_pipelines.builders import (
    DatasetSpec,
    is_prepared,
    parse_name,
    prepared_dir,
    read_metadata,
    valid_names,
)
from data_pipelines.builders.common import failure_limit as build_failure_limit
from data_pipelines.failure_limit import DEFAULT_MAX_FRACTION, FailureLimit
from unimedi_jax.core.app import run_app
from unimedi_jax.core.errors import UserError, reporting_user_errors
from unimedi_jax.core.paths import define_path


class PreparedDataMismatchError(UserError, ValueError):
    """Prepared data exists but was built with other options than the ones asked for."""


@dataclasses.dataclass(frozen=True)
class Summary:
    """What one prepared config holds."""

    name: str  # NAME/CONFIG
    path: Path
    built: bool  # False: it was already there
    kept: dict[str, int]  # split -> records
    skipped: dict[str, dict[str, int]]  # split -> reason -> inputs dropped
    options: dict[str, Any]
    skipped_files: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)
    # split -> reason -> the first files (or table rows) dropped for it

    def format(self, files_per_reason: int = 3) -> str:
        """The summary lines; under `skipped:`, one line per reason with its first files."""
        status = "built" if self.built else "already prepared"
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        kept = ", ".join(f"{split} {n}" for split, n in self.kept.items())
        lines = [f"{self.name} ({status}) -> {self.path}", f"  options: {opts}", f"  kept: {kept}"]
        totals: dict[str, int] = {}
        for reasons in self.skipped.values():
            for reason, n in reasons.items():
                totals[reason] = totals.get(reason, 0) + n
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(totals.items()))
        lines.append(f"  skipped: {skipped or 'none'}")
        for reason in sorted(totals):
            files = [f for r in self.skipped_files.values() for f in r.get(reason, [])]
            if files:
                more = totals[reason] - min(len(files), files_per_reason)
                shown = "; ".join(files[:files_per_reason]) + (f" (+{more} more)" if more else "")
                lines.append(f"    {reason}: {shown}")
        return "\n".join(lines)


def summarize(name: str, path: Path, built: bool) -> Summary:
    """Read the counts of a prepared dataset from its TFDS info and metadata files."""
    info = json.loads((path / "dataset_info.json").read_text())
    kept = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info["splits"]}
    metadata = read_metadata(path)
    return Summary(
        name,
        path,
        built,
        kept,
        metadata.get("skipped", {}),
        metadata.get("options", {}),
        metadata.get("skipped_files", {}),
    )


def _check_options(path: Path, name: str, options: Mapping[str, Any], spec: DatasetSpec) -> None:
    """Refuse prepared data whose recorded options differ from the requested ones; an option
    the data predates counts as the builder's ``UNRECORDED_DEFAULTS`` say."""
    unrecorded = getattr(spec.load(), "UNRECORDED_DEFAULTS", {})
    recorded = {**unrecorded, **read_metadata(path).get("options", {})}
    wrong = {
        k: (recorded[k], v)
        for k, v in options.items()
        if k in recorded and recorded[k] != _jsonable(v)
    }
    if wrong:
        diffs = ", ".join(f"{k}={old} (asked {new})" for k, (old, new) in wrong.items())
        raise PreparedDataMismatchError(
            f"{path} holds {name} prepared with {diffs}. Delete that directory to rebuild it "
            "with the new options, or use another data_dir."
        )


def _jsonable(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, list | tuple) else value


def _build(
    spec: DatasetSpec, config: str, data_dir: Path, manual_dir: str | None, options: dict
) -> None:
    if spec.needs_manual_dir and not manual_dir:
        raise ValueError(
            f"{spec.name} is built from files you download yourself: pass --manual_dir=DIR "
            f"(manual_dir=...) pointing at them"
        )
    module = spec.load()
    if manual_dir and hasattr(module, "check_manual_dir"):
        module.check_manual_dir(manual_dir)
    builder = module.make_builder(config, str(data_dir), **options)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=download_config)


def ensure_prepared(
    name: str,
    data_dir: str | Path,
    manual_dir: str | None = None,
    failure_limit: FailureLimit | None = None,
    **options: Any,
) -> list[Summary]:
    """Build every config of `name` that is not yet in `data_dir`; check the others' options.

    `options` are builder options such as image_size=64, volume_shape=(16, 64, 64); only the
    ones given are checked against existing data. Raises PreparedDataMismatchError when data
    built with other values is already there, and TooManyFailuresError when more of a split's
    inputs are damaged than `failure_limit` (default: 10%) allows; nothing is then written.
    """
    spec, configs = parse_name(name)
    valid = spec.load().OPTIONS
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{spec.name} does not take options {unknown}; valid: {list(valid)}")
    data_dir = Path(data_dir)
    summaries = []
    for config in configs:
        path = prepared_dir(data_dir, spec, config)
        full_name = f"{spec.name}/{config}"
        built = not is_prepared(path)
        if built:
            print(f"Preparing {full_name} in {data_dir} ...", flush=True)
            with build_failure_limit(failure_limit or FailureLimit()):
                _build(spec, config, data_dir, manual_dir, dict(options))
        else:
            _check_options(path, full_name, options, spec)
        summaries.append(summarize(full_name, path, built))
    return summaries


def check_prepared(name: str, data_dir: str | Path, **options: Any) -> None:
    """Raises PreparedDataMismatchError when a config of `name` prepared in `data_dir` was built
    with other `options`; builds nothing (configs not prepared there are left to the reader)."""
    spec, configs = parse_name(name)
    for config in configs:
        path = prepared_dir(data_dir, spec, config)
        if is_prepared(path):
            _check_options(path, f"{spec.name}/{config}", options, spec)


class _ShapeParser(flags.ArgumentParser):
    """Sizes like 32,128,128 or 32x128x128 (absl reports a bad value as a flag error)."""

    def parse(self, argument: str | Sequence[int]) -> tuple[int, ...]:
        if not isinstance(argument, str):
            return tuple(int(n) for n in argument)
        try:
            return tuple(int(n) for n in argument.replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"expected sizes like 32,128,128, got {argument!r}") from None

    def flag_type(self) -> str:
        return "sizes"


# Builder options as flags: (name, kind, help); a builder takes the ones it lists in OPTIONS.
_OPTIONS = (
    ("image_size", "int", "stored 2D size (square, letterboxed)"),
    ("volume_shape", "sizes", "stored 3D shape D,H,W"),
    ("lesions", "string", "phantoms: lung-lesion sizes, lobar | small"),
    ("num_train", "int", "phantoms: training samples"),
    (
        "num_validation",
        "int",
        "phantoms: validation samples; chexpert: training images held out (by patient)",
    ),
    ("num_test", "int", "phantoms: test samples"),
    ("seed", "int", "phantoms: generator seed; real data: split seed"),
    ("translations", "string", "bimcv_covid19: English reports (CSV: session_id, text)"),
    ("uncertain", "string", "chexpert: paper | ones | zeros | Name=0|1,..."),
    ("train_file", "string", "covidx: training split file (default train.txt)"),
    ("test_file", "string", "covidx: test split file (default test.txt)"),
    ("gray_window", "sizes", "cc_ccii: int16 range of grey 0..255"),
    ("crop_mm", "sizes", "luna16: crop size D,H,W in mm"),
    ("negatives_per_positive", "float", "luna16: non-nodule crops per nodule crop"),
    ("candidates", "string", "luna16: candidates file (default candidates.csv)"),
    ("validation_subsets", "sizes", "luna16: e.g. 8 or 7,8"),
    ("test_subsets", "sizes", "luna16: e.g. 9"),
    ("num_workers", "int", "real data: reader processes (default: CPUs)"),
)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command's flags, defined only when it runs as a command (or on a fresh flag set by
    ``run``): modules that import this one for ``ensure_prepared`` (data_pipelines.benchmark,
    tests) then keep their own names."""
    define_path("data_dir", "Where prepared datasets live.", flag_values=flag_values, required=True)
    define_path(
        "manual_dir", "Raw files of datasets that cannot be downloaded.", flag_values=flag_values
    )
    flags.DEFINE_float(
        "max_failure_fraction",
        DEFAULT_MAX_FRACTION,
        "Stop when more of a split's inputs are damaged (unreadable, missing, NaN, ...).",
        flag_values=flag_values,
    )
    define = {
        "int": flags.DEFINE_integer,
        "float": flags.DEFINE_float,
        "string": flags.DEFINE_string,
        "sizes": lambda name, default, help_text, flag_values: flags.DEFINE(
            _ShapeParser(), name, default, help_text, flag_values=flag_values
        ),
    }
    for name, kind, help_text in _OPTIONS:
        define[kind](name, None, help_text, flag_values=flag_values)


def prepare_named(argv: Sequence[str], given: flags.FlagValues) -> int:
    """Builds the dataset named in ``argv`` (the positional arguments after the program name)
    with the options in ``given`` and prints the summaries."""
    names = list(argv[1:])
    if len(names) != 1:
        raise app.UsageError(
            "name one dataset (or NAME/CONFIG) before the flags, e.g. python -m "
            "data_pipelines.prepare phantoms --data_dir=DIR; names: " + ", ".join(valid_names())
        )
    options = {name: given[name].value for name, _, _ in _OPTIONS if given[name].value is not None}
    limit = FailureLimit(given.max_failure_fraction)
    summaries = ensure_prepared(names[0], given.data_dir, given.manual_dir, limit, **options)
    print("\nSummary")
    for summary in summaries:
        print(summary.format())
    return 0


def main(argv: Sequence[str]) -> int:
    """The command: builds the dataset named first on the command line."""
    return prepare_named(argv, flags.FLAGS)


def run(args: Sequence[str]) -> int:
    """``python -m data_pipelines.prepare ARGS`` inside this process (tests, scripts), on a flag
    set of its own: the same parsing, output and exit status 2 for a user's mistake."""
    given = flags.FlagValues()
    define_flags(given)

    def command() -> int:
        return prepare_named(given(["prepare", *args]), given)

    return reporting_user_errors(command, also=(ValueError,))()


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    define_flags()
    # The builders report a bad option (a value, a split file, a window) as ValueError.
    run_app(main, also=(ValueError,))


if __name__ == "__main__":
    cli()
