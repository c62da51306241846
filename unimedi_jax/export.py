"""PyTorch export of a run: ``python -m unimedi_jax.export --workdir=W --format=F --out=DIR``.

    python -m unimedi_jax.export --workdir=runs/demo --format=torch --out=export/torch
    python -m unimedi_jax.export --workdir=runs/demo --format=monai --out=export/monai
    python -m unimedi_jax.export --workdir=runs/demo --format=timm --out=export/timm --size=224,224
    python -m unimedi_jax.export --workdir=runs/demo --format=hf_bert --out=export/bert

Formats: torch (the whole model, for ``unimedi_jax.torch_model.load``), monai (3D path, MONAI's
ViT/UNETR), timm (2D path), hf_bert (text tower). Each is a directory with
``model.safetensors``, ``config.json`` and a ``README.md`` model card; the loading recipes are
in ``unimedi_jax/interop/torch_export.py``, which does the work.
"""

from __future__ import annotations

from absl import flags

from unimedi_jax.config.checks import VISION_WEIGHTS
from unimedi_jax.core.app import run_app
from unimedi_jax.core.paths import define_path, shown_path
from unimedi_jax.interop.torch_export import FORMATS, export_run

_WORKDIR = define_path("workdir", "Run workdir or its checkpoints/<step>.")
_FORMAT = flags.DEFINE_enum("format", None, FORMATS, "What to export.")
_OUT = define_path("out", "Output directory, outside the run (written when complete).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out.")
_SIZE = flags.DEFINE_list(
    "size",
    None,
    "timm: image H,W; monai: volume D,H,W (default: the training size; torch and hf_bert are "
    "written at the training sizes).",
)
_IN_CHANS = flags.DEFINE_integer("in_chans", 1, "timm: input channels.", lower_bound=1)
_VISION_WEIGHTS = flags.DEFINE_enum(
    "vision_weights",
    None,
    VISION_WEIGHTS,
    "The vision tower to export (default: the run's vision_weights in its config.json).",
)
flags.mark_flags_as_required(["workdir", "format", "out"])
flags.register_validator(
    "size",
    lambda size: size is None or all(v.strip().isdigit() for v in size),
    "--size takes positive whole numbers separated by commas, e.g. --size=224,224",
)


def main(argv: list[str]) -> None:
    del argv
    size = None if _SIZE.value is None else tuple(int(v) for v in _SIZE.value)
    out = export_run(
        _WORKDIR.value,
        _FORMAT.value,
        _OUT.value,
        size=size,
        in_chans=_IN_CHANS.value,
        weights=_VISION_WEIGHTS.value,
        overwrite=_OVERWRITE.value,
    )
    print(f"wrote {shown_path(str(out))}")


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
