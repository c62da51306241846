"""Embed X-ray and CT files with a run: ``python -m unimedi_jax.embed --workdir=RUN --out=F.npz
PATH... [--texts TEXT...]``.

    python -m unimedi_jax.embed --workdir=runs/demo --out=embeddings.npz scans/ chest.dcm \
        --texts "No pleural effusion." "Large left pleural effusion."

Each PATH is a file or a folder: PNG, JPEG and single-frame DICOM files are X-rays; NIfTI files,
multi-frame DICOM files and folders holding a DICOM series are CTs; other folders are walked.
All are read with the preprocessing the run recorded. ``--out`` gets ``embeddings`` [N, E],
``paths`` and ``kinds`` (``np.load(F, allow_pickle=False)``) and the inputs that failed with the
reason (also printed); the command exits 0 when at least one input was embedded. ``--texts``
(the arguments after it, up to the next flag, or ``--texts=T`` repeated) also prints each input
against each text (cosine similarity) and saves it as ``similarity`` [N, T]. Files are decoded
in ``--read_workers`` processes while the model embeds, with a progress line (done, files/s,
ETA) on stderr every 10 s.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

from data_pipelines import imaging
from unimedi_jax import inference
from unimedi_jax.core.app import parse_absl_flags, run_app
from unimedi_jax.core.errors import UserError
from unimedi_jax.core.paths import define_path, shown_path
from unimedi_jax.evaluation.embed_files import embed_files, skipped_line, zero_shot_table

_WORKDIR = define_path("workdir", "Run workdir or its checkpoints/<step>.")
_OUT = define_path("out", "The .npz file to write.")
_TEXTS = flags.DEFINE_multi_string(
    "texts", [], "Report texts to compare each input with (the arguments after --texts)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Inputs per compiled batch.", lower_bound=1)
_CT_INTENSITY = flags.DEFINE_string(
    "ct_intensity",
    "auto",
    "What CT values are: auto (Hounsfield units; a volume whose values cannot be is refused), "
    "hu (Hounsfield units, unchecked) or windowed:MAX (already windowed: 0..MAX spans the run's "
    "HU window, e.g. windowed:255 for an 8-bit export).",
)
_READ_WORKERS = flags.DEFINE_integer(
    "read_workers",
    max(1, min(8, (os.cpu_count() or 2) - 1)),
    "Processes decoding files while the model embeds the batch before; 0 reads in this one.",
    lower_bound=0,
)
flags.mark_flags_as_required(["workdir", "out"])


class NothingEmbeddedError(UserError):
    """No input could be read."""


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parsing, with ``--texts A B C`` (each argument up to the next flag) spelled
    ``--texts=A --texts=B --texts=C`` first, so texts with spaces need no repeated flag."""
    rewritten, in_texts = [argv[0]], False
    for arg in argv[1:]:
        if arg == "--texts":
            in_texts = True
        elif in_texts and not arg.startswith("--"):
            rewritten.append(f"--texts={arg}")
        else:
            in_texts = False
            rewritten.append(arg)
    return parse_absl_flags(rewritten)


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise UserError("give the files or folders to embed after the flags: embed ... PATH...")
    try:
        imaging.check_intensity(_CT_INTENSITY.value)
    except ValueError as err:
        raise UserError(f"--ct_intensity: {err}") from err
    model = inference.load(_WORKDIR.value, batch_size=_BATCH_SIZE.value)
    embedded = embed_files(
        model,
        paths,
        _CT_INTENSITY.value,
        workers=_READ_WORKERS.value,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if embedded.skipped:
        print(skipped_line(embedded.skipped))
    for path, note in embedded.notes:
        print(f"warning {path}: {note}")
    for path, reason in embedded.failed:
        print(f"failed {path}: {reason}")
    if not embedded.paths:
        raise NothingEmbeddedError(
            f"none of the {len(embedded.failed)} inputs could be embedded (each is listed "
            "above with the reason); nothing was written to --out"
        )
    texts = _TEXTS.value
    similarity = embedded.embeddings @ model.embed_texts(texts).T if texts else None
    embedded.save(_OUT.value, texts, similarity)
    images = embedded.kinds.count(imaging.IMAGE)
    print(
        f"wrote {shown_path(_OUT.value)}: {len(embedded.paths)} embeddings ({images} images, "
        f"{len(embedded.paths) - images} volumes), {len(embedded.failed)} failed"
    )
    if texts:
        print(zero_shot_table(embedded, texts, similarity))


def cli() -> None:
    """The command, for ``python -m`` and the console script alike."""
    run_app(main, _parse_flags)


if __name__ == "__main__":
    cli()
