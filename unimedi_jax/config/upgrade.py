"""A pre-training run's saved ``config.json`` brought up to today's fields, in one place.

A run saved by an older version lacks the fields added since. Every reader of a saved config
(``inference.load_config``, so evaluate, export, visualize and the downstream tables; the
workdir's resume check) reads it with ``read_run_config``, which passes it through
``upgrade_config`` once, which fills each missing field
with the value that reproduces how that older version behaved; code past that point reads every
field directly. A field added later gets its line in ``ADDED_FIELDS``, not a ``.get`` default
where it is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from unimedi_jax.config import evaluator_settings, preprocessing
from unimedi_jax.core.run_folders import PRETRAIN

# (field, the value that reproduces a run saved before the field existed, or a function of the
# upgraded config that gives it), oldest first.
ADDED_FIELDS: tuple[tuple[str, Any], ...] = (
    # In-loop evaluation came with these; a run without them evaluated as the defaults say.
    ("evals", ("retrieval",)),
    ("eval_split", "validation"),
    ("eval_limit", 500),
    ("model.unroll_layers", False),  # layers ran under nn.scan
    ("probe_train_limit", 2000),
    ("keep_checkpoint_every_steps", 0),  # no extra checkpoints kept
    ("on_shape_change", "refuse"),
    ("model.pixel_mean", 0.0),  # [0, 1] inputs went to the patch projection as they were
    ("model.pixel_std", 1.0),
    ("data.max_failure_fraction", 1.0),  # unusable records were replaced, without a limit
    ("train.on_nonfinite", "stop"),
    ("mesh.preset", "dp"),  # mesh.data / .fsdp / .tensor gave the sizes themselves
    ("loss.contrast", "joint"),  # one softmax over all pairs of the batch
    ("text.pooling", "cls"),  # the report's [CLS] state
    ("kind", PRETRAIN),  # only pre-training wrote a config.json
    ("loss.pcl_tokens", "masked"),  # iBOT's L_pcl on the masked patches
    ("masking.per_part", False),  # one top-k over a volume's whole sequence
    ("selection.layers", "all"),  # Eq. 1 averaged over all layers
    ("train.clip_mode", "global"),  # the global gradient norm was clipped
    ("masking.unmasked_tuning_fraction", 0.0),  # the student's tokens were masked to the end
    ("vision_weights", "teacher"),  # evaluation, inference and exports used the EMA teacher
    # Every evaluator took the run-wide eval_every_steps, eval_split and eval_limit.
    ("eval_settings", evaluator_settings.inherit_defaults()),
    # Files were read with the defaults of the time: X-rays stored at prepare's default size.
    ("preprocessing", preprocessing.before_recorded),
    ("model.attention", "xla"),  # XLA's attention on every backend
    # Both modalities were masked at masking.ratio / .mode, and L_pcl read both.
    ("masking.image_ratio", -1.0),
    ("masking.image_mode", ""),
    ("masking.volume_ratio", -1.0),
    ("masking.volume_mode", ""),
    ("loss.pcl_modalities", ("image", "volume")),
    ("data.phantom_lesions", "lobar"),  # the phantoms had lobar-scale lung lesions
    ("eval_settings.slice_choice", {"every_steps": -1, "split": "", "limit": -1}),
)


def upgrade_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a run's saved config with every field added since it was saved filled in
    (``ADDED_FIELDS``); a config that has them all comes back equal to itself."""
    upgraded = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in ADDED_FIELDS:
        *sections, name = dotted.split(".")
        node = upgraded
        for section in sections:
            node = node[section]
        if name not in node:
            node[name] = value(upgraded) if callable(value) else value
    return upgraded


def read_run_config(workdir: Path) -> ml_collections.ConfigDict:
    """The config a pre-training run saved in ``workdir/config.json`` at its start, upgraded."""
    saved = json.loads((Path(workdir) / "config.json").read_text())
    return upgrade_config(ml_collections.ConfigDict(saved))
