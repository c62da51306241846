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

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

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


class PreparedDataMismatchError(ValueError):
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


def _check_options(path: Path, name: str, options: dict[str, Any]) -> None:
    """Refuse prepared data whose recorded options differ from the requested ones."""
    recorded = read_metadata(path).get("options", {})
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
            _check_options(path, full_name, options)
        summaries.append(summarize(full_name, path, built))
    return summaries


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 32,128,128, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.prepare",
        description="Build a dataset into ArrayRecord files. Names: " + ", ".join(valid_names()),
    )
    p.add_argument("name", help="dataset name, or NAME/CONFIG for one config")
    p.add_argument("--data_dir", required=True, help="where prepared datasets live")
    p.add_argument("--manual_dir", help="raw files of datasets that cannot be downloaded")
    p.add_argument(
        "--max_failure_fraction",
        type=float,
        default=DEFAULT_MAX_FRACTION,
        help="stop when more of a split's inputs are damaged (unreadable, missing, NaN, ...)",
    )
    p.add_argument("--image_size", type=int, help="stored 2D size (square, letterboxed)")
    p.add_argument("--volume_shape", type=_shape, help="stored 3D shape D,H,W")
    p.add_argument("--num_train", type=int, help="phantoms: training samples")
    p.add_argument(
        "--num_validation",
        type=int,
        help="phantoms: validation samples; chexpert: training images held out (by patient)",
    )
    p.add_argument("--num_test", type=int, help="phantoms: test samples")
    p.add_argument("--seed", type=int, help="phantoms: generator seed; real data: split seed")
    p.add_argument("--translations", help="bimcv_covid19: English reports (CSV: session_id, text)")
    p.add_argument("--uncertain", help="chexpert: paper | ones | zeros | Name=0|1,...")
    p.add_argument("--train_file", help="covidx: training split file (default train.txt)")
    p.add_argument("--test_file", help="covidx: test split file (default test.txt)")
    p.add_argument("--gray_window", type=_shape, help="cc_ccii: int16 range of grey 0..255")
    p.add_argument("--crop_mm", type=_shape, help="luna16: crop size D,H,W in mm")
    p.add_argument(
        "--negatives_per_positive", type=float, help="luna16: non-nodule crops per nodule crop"
    )
    p.add_argument("--candidates", help="luna16: candidates file (default candidates.csv)")
    p.add_argument("--validation_subsets", type=_shape, help="luna16: e.g. 8 or 7,8")
    p.add_argument("--test_subsets", type=_shape, help="luna16: e.g. 9")
    p.add_argument("--num_workers", type=int, help="real data: reader processes (default: CPUs)")
    return p


_NOT_OPTIONS = ("name", "data_dir", "manual_dir", "max_failure_fraction")


def _prepare(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and v is not None}
    limit = FailureLimit(args.max_failure_fraction)
    summaries = ensure_prepared(args.name, args.data_dir, args.manual_dir, limit, **options)
    print("\nSummary")
    for summary in summaries:
        print(summary.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2, one paragraph, on a mistake to fix)."""
    # The command's part only: the library above stays free of unimedi_jax.
    from unimedi_jax.core.errors import exit_on_user_error

    # The builders report a bad option (a value, a split file, a window) as ValueError.
    return exit_on_user_error(also=(ValueError,))(_prepare)(argv)


if __name__ == "__main__":
    sys.exit(main())
