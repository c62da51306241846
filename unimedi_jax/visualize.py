"""Figures of a trained run (the paper's Figs. 2, 5, 7) as PNG files.

    python -m unimedi_jax.visualize slices  --workdir=W --out=slices.png   [--num=3] [--split=test]
    python -m unimedi_jax.visualize masking --workdir=W --out=masking.png  [--num=4]
    python -m unimedi_jax.visualize tsne    --workdir=W --out=tsne.png     [--num=200]
    python -m unimedi_jax.visualize curves  --workdir=W [W2 ...] --out=curves.png

``slices``: CT volumes as strips of axial slices, the k slices picked by Eq. 2 framed, the score
curve under each strip and, where the data knows them (phantoms), the lesion slices marked.
``masking``: X-rays, the tokens the teacher's Eq. 1 attention keeps unmasked, the attention map
with its colour bar. Every figure's title (and PNG Title) names the run, step and split.
``tsne``: a t-SNE of held-out X-ray, CT and report embeddings, by modality (marker) and finding
(colour). ``curves``: loss terms, learning rate and throughput from metrics.jsonl, the runs
overlaid. The figures are drawn by ``unimedi_jax/evaluation/figures.py``.
"""

from __future__ import annotations

from absl import app, flags

from unimedi_jax.core.app import run_app
from unimedi_jax.core.errors import VIZ_EXTRA, require_extra
from unimedi_jax.core.paths import absolute_path, define_path, shown_path

require_extra("visualize", "viz", VIZ_EXTRA)
from unimedi_jax.evaluation.figures import (  # noqa: E402  (after the check above)
    DEFAULT_NUM,
    FIGURES,
    draw_curves,
    draw_figure,
)

_WORKDIR = define_path("workdir", "Run directory or a checkpoint dir.")
_OUT = define_path("out", "PNG file to write, outside the run's folder.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_NUM = flags.DEFINE_integer(
    "num",
    None,
    f"Records to draw, abnormal ones first (per modality for tsne); default {DEFAULT_NUM}.",
    lower_bound=1,
)
_SPLIT = flags.DEFINE_string("split", "test", "Held-out split to draw from.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    figure, *more_runs = argv[1:] or [""]
    if figure == "curves":  # more runs may follow the figure name, to overlay
        out = draw_curves(
            [_WORKDIR.value, *map(absolute_path, more_runs)], _OUT.value, _OVERWRITE.value
        )
    elif figure in FIGURES and not more_runs:
        out = draw_figure(
            figure, _WORKDIR.value, _OUT.value, _NUM.value, _SPLIT.value, _OVERWRITE.value
        )
    else:
        raise app.UsageError(
            f"name one figure before the flags, one of {', '.join(sorted([*FIGURES, 'curves']))}"
            f" (got {' '.join(argv[1:]) or 'none'}), e.g. python -m unimedi_jax.visualize slices "
            "--workdir=runs/demo --out=slices.png"
        )
    print(f"wrote {shown_path(str(out))}")


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
