"""Input-pipeline throughput: samples/s of the 2D and 3D streams for several worker counts.

    python -m data_pipelines.benchmark [--data_dir=DIR] [--workers=0,1,2] [--runs=3]

Prepares phantoms at the paper's stored sizes (256x256 X-rays, 32x128x128 CT) into `data_dir`
on first use, then times TrainStream with 224x224 crops: each run starts a fresh stream, skips
its first batch (worker start-up) and times the next `--steps` batches. Prints the median of
the runs. The tokenizer is a whole-word vocabulary of the phantom reports, so tokenising costs
what a WordPiece vocabulary costs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ml_collections
from transformers import BertTokenizerFast

from data_pipelines import pipeline, prepare

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def word_tokenizer(texts: list[str], directory: Path) -> BertTokenizerFast:
    """A BERT tokenizer whose vocabulary is every lower-cased word and symbol of `texts`."""
    pre = BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIALS)}, do_lower_case=True)
    splitter = pre.backend_tokenizer.pre_tokenizer
    normalizer = pre.backend_tokenizer.normalizer
    words = {w for t in texts for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))}
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join([*SPECIALS, *sorted(words)]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)


def make_config(
    data_dir: str, modality: str, workers: int, batch: int
) -> ml_collections.ConfigDict:
    """The fields TrainStream reads, at the paper's sizes, with one modality switched on."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(
        {
            "data_dir": data_dir,
            "sources_2d": "phantoms" if modality == "2d" else "",
            "sources_3d": "phantoms" if modality == "3d" else "",
            "worker_count": workers,
            "hu_window": (-1000.0, 1000.0),
        }
    )
    c.batch = ml_collections.ConfigDict({"size_2d": batch, "size_3d": batch})
    c.model = ml_collections.ConfigDict({"image_size": (224, 224), "volume_size": (32, 128, 128)})
    c.text = ml_collections.ConfigDict({"max_length": 112})
    return c


def time_stream(config: ml_collections.ConfigDict, tokenizer, steps: int) -> float:
    """Samples/s of one fresh stream over `steps` batches after the first."""
    stream = pipeline.TrainStream(config, tokenizer)
    try:
        next(stream)
        start = time.perf_counter()
        rows = sum(len(next(iter(next(stream).values()))) for _ in range(steps))
        return rows / (time.perf_counter() - start)
    finally:
        stream.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.benchmark")
    parser.add_argument("--data_dir", default=str(Path(tempfile.gettempdir()) / "unimedi_bench"))
    parser.add_argument("--num_train", type=int, default=256, help="phantoms per modality")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_2d", type=int, default=32)
    parser.add_argument("--batch_3d", type=int, default=8)
    args = parser.parse_args()

    for summary in prepare.ensure_prepared(
        "phantoms",
        args.data_dir,
        image_size=256,
        volume_shape=(32, 128, 128),
        num_train=args.num_train,
        num_validation=0,
        num_test=0,
    ):
        print(summary.format())
    texts = pipeline.report_texts(make_config(args.data_dir, "2d", 0, 1))
    tokenizer = word_tokenizer(texts, Path(tempfile.mkdtemp()))
    for modality, batch in (("2d", args.batch_2d), ("3d", args.batch_3d)):
        for workers in (int(w) for w in args.workers.split(",")):
            config = make_config(args.data_dir, modality, workers, batch)
            rates = [time_stream(config, tokenizer, args.steps) for _ in range(args.runs)]
            print(
                f"{modality} batch {batch} workers {workers}: {statistics.median(rates):8.1f} "
                f"samples/s (runs: {', '.join(f'{r:.1f}' for r in rates)})",
                flush=True,
            )


if __name__ == "__main__":
    main()
