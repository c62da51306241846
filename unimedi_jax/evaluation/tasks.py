"""The downstream-task registry: which datasets have labels, their task, the probe's label
fractions and role-to-split map, and how the probe and fine-tuning configs read
``dataset=NAME,...`` arguments.

A dataset's task, class names and modality come from its builder module (``TASK``,
``CLASS_NAMES``) and registry entry (``DatasetSpec.modalities``), so a new labelled builder is
probed and fine-tuned with no change here. Kept free of jax so config files can import it.
"""

from __future__ import annotations

import dataclasses

from data_pipelines import builders
from data_pipelines.builders.common import TASKS
from unimedi_jax.core.errors import UserError

FRACTIONS = (0.01, 0.1, 1.0)  # the paper's label fractions (Tables 1 and 2)
# Probe and fine-tuning roles -> the split each reads (configs' `splits`, the in-loop probe).
SPLITS = {"train": "train", "val": "validation", "test": "test"}
ROLES = tuple(SPLITS)


class ProtocolError(UserError, ValueError):
    """A probe or fine-tuning request that names something that does not exist."""


@dataclasses.dataclass(frozen=True)
class Downstream:
    """One labelled dataset config as the probe and the fine-tuning read it."""

    name: str  # NAME, or NAME/CONFIG for a dataset with several modalities
    modality: str  # '2d' | '3d'
    task: str  # 'multilabel' | 'binary' | 'multiclass'
    classes: tuple[str, ...]

    @property
    def metric(self) -> str:
        """The figure the paper reports: accuracy for multiclass, AUROC otherwise."""
        return "accuracy" if self.task == "multiclass" else "auroc"

    @property
    def label_key(self) -> str:
        """The record feature holding the label: multi-hot 'labels' or the class 'label'."""
        return "labels" if self.task == "multilabel" else "label"


def _labelled(spec: builders.DatasetSpec) -> bool:
    return getattr(spec.load(), "TASK", None) in TASKS


def labelled_names(modality: str | None = None) -> list[str]:
    """Every name ``resolve`` accepts (optionally of one modality): NAME for a one-config
    dataset, NAME/CONFIG for each config of a dataset with several."""
    names = []
    for spec in builders.REGISTRY.values():
        if not _labelled(spec):
            continue
        for mod, config in spec.modalities.items():
            if modality in (None, mod):
                names.append(spec.name if len(spec.modalities) == 1 else f"{spec.name}/{config}")
    return names


def resolve(name: str, modality: str | None = None, field: str = "dataset") -> Downstream:
    """The labelled dataset ``name`` (of ``modality`` when given), or ProtocolError listing the
    valid names; ``field`` is what the message calls the setting that named it."""
    valid = labelled_names(modality)
    kind = f"labelled {modality} dataset" if modality else "labelled dataset"
    if name not in valid:
        raise ProtocolError(f"{field}={name!r} is not a {kind}; valid: {', '.join(valid)}")
    spec, _, mod = builders.resolve(name)
    module = spec.load()
    return Downstream(name, mod, module.TASK, tuple(module.CLASS_NAMES))


def parse_arg(arg: str | None, file: str, keys: tuple[str, ...]) -> dict[str, str]:
    """``'dataset=chexpert,fraction=0.01'`` -> {'dataset': 'chexpert', 'fraction': '0.01'}.

    ``dataset`` is required; a key outside ``keys`` is an error naming ``file`` and the keys.
    """
    usage = f"{file}:" + ",".join(f"{k}=..." for k in keys)
    out = {}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise ProtocolError(
                f"{file}: bad argument {item!r}; use {usage} (keys: {', '.join(keys)})"
            )
        out[key] = value.strip()
    if not out.get("dataset"):
        raise ProtocolError(
            f"{file} needs a dataset: {usage}, with dataset one of {', '.join(labelled_names())}"
        )
    return out


def parse_fractions(text: str | None, file: str) -> tuple[float, ...]:
    """``'0.01'`` -> (0.01,); None -> all of FRACTIONS; anything else is an error."""
    if text is None:
        return FRACTIONS
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction not in FRACTIONS:
        raise ProtocolError(
            f"{file}: fraction={text!r}; the paper's label fractions are "
            f"{', '.join(map(str, FRACTIONS))} (leave it out for all three)"
        )
    return (fraction,)
