"""Input-pipeline throughput: samples/s of the 2D and 3D streams for several worker counts.

    python -m data_pipelines.benchmark [--config=configs/pretrain.py[:preset]] [--data_dir=DIR]
        [--workers=0,1,2] [--runs=3] [--steps=8] [--config.batch.size_2d=32 ...]

Reads the trainer's own config (default: the paper's, ``configs/pretrain.py``), so every data
field a run uses (crop and volume sizes, HU window, report length, batch sizes, failure limit,
...) reaches the streams timed here; only the sources (phantoms), ``data.data_dir`` and
``data.worker_count`` are replaced. Prepares phantoms with X-rays stored at --stored_image_size
(the paper stores 256 and crops ``model.image_size``) and CTs of ``model.volume_size`` into
--data_dir on first use, then times TrainStream: each run starts a fresh stream, skips its first
batch (worker start-up) and times the next --steps batches. Prints the median of the runs, and
for in-process streams (0 workers) the samples per CPU-second of this process, i.e. per core.
The tokenizer is a whole-word vocabulary of the phantom reports, so tokenising costs what a
WordPiece vocabulary costs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags
from transformers import BertTokenizerFast

from data_pipelines import prepare, sources, train_stream
from unimedi_jax.core.app import run_app
from unimedi_jax.core.paths import define_path

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Resolved as any --config is: the working directory's, else the packaged configs.
_DEFAULT_CONFIG = "configs/pretrain.py"


def define_flags() -> None:
    """The command's flags, defined only when it runs as a command: importing this module for
    `run` or `stream_config` beside another command's module then defines no second --config."""
    config_flags.DEFINE_config_file(
        "config", None, "The trainer's config, e.g. configs/pretrain.py:demo (default: the paper's)"
    )
    define_path(
        "data_dir",
        "Where phantoms are prepared.",
        str(Path(tempfile.gettempdir()) / "unimedi_bench"),
    )
    flags.DEFINE_integer("num_train", 256, "Phantoms per modality.")
    flags.DEFINE_integer("stored_image_size", 256, "Stored X-ray side (>= the crop).")
    flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to time.")
    flags.DEFINE_integer("runs", 3, "Fresh streams per setting; the median is printed.")
    flags.DEFINE_integer("steps", 8, "Timed batches per run, after the first.")


def word_tokenizer(texts: list[str], directory: Path) -> BertTokenizerFast:
    """A BERT tokenizer whose vocabulary is every lower-cased word and symbol of `texts`."""
    pre = BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIALS)}, do_lower_case=True)
    splitter = pre.backend_tokenizer.pre_tokenizer
    normalizer = pre.backend_tokenizer.normalizer
    words = {w for t in texts for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))}
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join([*SPECIALS, *sorted(words)]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)


def stream_config(
    config: ml_collections.ConfigDict, data_dir: str, modality: str, workers: int
) -> ml_collections.ConfigDict:
    """The trainer's config reading phantoms from `data_dir`, with one modality switched on
    ("2d", "3d"; "" switches both on); every other field is the trainer's."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.data_dir = data_dir
    c.data.sources_2d = "phantoms" if modality in ("2d", "") else ""
    c.data.sources_3d = "phantoms" if modality in ("3d", "") else ""
    c.data.worker_count = workers
    return c


def time_stream(config: ml_collections.ConfigDict, tokenizer, steps: int) -> tuple[float, float]:
    """(samples per second, samples per CPU-second of this process) of one fresh stream over
    `steps` batches after the first."""
    stream = train_stream.TrainStream(config, tokenizer)
    try:
        next(stream)
        start, cpu_start = time.perf_counter(), time.process_time()
        rows = sum(len(next(iter(next(stream).values()))) for _ in range(steps))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return rows / wall, rows / max(cpu, 1e-9)
    finally:
        stream.close()


def run(
    config: ml_collections.ConfigDict,
    data_dir: str,
    *,
    workers: list[int],
    runs: int,
    steps: int,
    num_train: int,
    stored_image_size: int,
) -> list[str]:
    """Prepares the phantoms if needed, times every (modality, workers) and returns one printed
    line each."""
    for summary in prepare.ensure_prepared(
        "phantoms",
        data_dir,
        image_size=stored_image_size,
        volume_shape=tuple(int(n) for n in config.model.volume_size),
        num_train=num_train,
        num_validation=0,
        num_test=0,
    ):
        print(summary.format())
    texts = sources.report_texts(stream_config(config, data_dir, "", 0))
    tokenizer = word_tokenizer(texts, Path(tempfile.mkdtemp()))
    lines = []
    for modality in ("2d", "3d"):
        batch = int(config.batch[f"size_{modality}"])
        for count in workers:
            c = stream_config(config, data_dir, modality, count)
            rates, cpu_rates = zip(
                *(time_stream(c, tokenizer, steps) for _ in range(runs)), strict=True
            )
            per_core = f"{statistics.median(cpu_rates):8.1f}" if count == 0 else "     n/a"
            line = (
                f"{modality} batch {batch} workers {count}: {statistics.median(rates):8.1f} "
                f"samples/s, {per_core} samples/CPU-s "
                f"(runs: {', '.join(f'{r:.1f}' for r in rates)})"
            )
            print(line, flush=True)
            lines.append(line)
    return lines


def main(argv: list[str]) -> None:
    del argv
    given = flags.FLAGS
    run(
        given.config,
        given.data_dir,
        workers=[int(w) for w in given.workers],
        runs=given.runs,
        steps=given.steps,
        num_train=given.num_train,
        stored_image_size=given.stored_image_size,
    )


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    define_flags()
    run_app(main, default_config=_DEFAULT_CONFIG)


if __name__ == "__main__":
    cli()
