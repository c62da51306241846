"""Where the train step's time goes: a profiler trace of the step, per op kind and part.

    python -m unimedi_jax.profile_step --config=configs/pretrain.py[:preset] [--steps 2]
        [--out DIR] [--top 15] [--config.batch.size_2d=32 ...]

Compiles the step of the config as ``python -m unimedi_jax.benchmark`` does (random batches, no
data), traces ``--steps`` steps after one warm-up with ``jax.profiler`` and prints markdown
tables: op time per op kind, per part of the step (student vision forward / backward, teacher,
text tower, DINO head, losses, update) and the biggest ops. With ``--out``: ``profile.md``,
``profile.json``, the compiled step's HLO text and the trace (``DIR/trace``, for Perfetto or
TensorBoard). How ops are
attributed: ``unimedi_jax/diagnostics/step_profile.py``.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from unimedi_jax.core.app import run_app
from unimedi_jax.core.paths import define_path
from unimedi_jax.diagnostics.step_profile import profile_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/pretrain.py:demo", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 2, "Traced steps after one warm-up step.", lower_bound=1)
_OUT = define_path(
    "out", "Folder for profile.md, profile.json, step.hlo.txt and the trace (default: none)."
)
_TOP = flags.DEFINE_integer("top", 15, "Rows of the op-kind and biggest-op tables.", lower_bound=1)
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    del argv
    text, _ = profile_step(_CONFIG.value, _STEPS.value, _OUT.value, _TOP.value)
    print(text)
    if _OUT.value:
        print(f"wrote {_OUT.value}/profile.md, profile.json, step.hlo.txt, trace/")


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
