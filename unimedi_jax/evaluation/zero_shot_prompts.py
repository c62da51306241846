"""Zero-shot prompts: the files of ``configs/prompts/<benchmark>.json`` read, checked and
expanded (GLoRIA's templates), and the dataset label columns they name.

Prompts are data: ``pairs`` (label -> [positive, negative]) or ``classes`` (class -> [prompt, ...]
or template parts), with an optional ``cross_modal`` section; ``--config.prompts=FILE.json``
replaces a benchmark's file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipelines import builders
from unimedi_jax.core.errors import UserError
from unimedi_jax.core.overrides import packaged_config_dir

PROMPTS_DIR = packaged_config_dir() / "prompts"  # configs/prompts, in a checkout or a wheel
# The builder attribute naming each label column, where it is not CLASS_NAMES.
_LABEL_NAMES = {
    "ct_rate": "ABNORMALITIES",
    "rad_chestct": "ABNORMALITIES",
    "mimic_cxr_jpg": "CHEXPERT_LABELS",
}


class PromptError(UserError, ValueError):
    """A prompt file that cannot be read or does not fit the dataset's labels."""


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A prompt file: positive/negative pairs per label, or a list of prompts per class."""

    path: Path
    pairs: dict[str, tuple[str, str]]
    classes: dict[str, tuple[str, ...]]
    # The labels shared with the other modality, worded like its reports ("cross_modal").
    cross_modal: Prompts | None = None


def prompts_path(dataset: str) -> Path:
    """The shipped prompt file of ``dataset`` (NAME or NAME/CONFIG): configs/prompts/NAME.json."""
    return PROMPTS_DIR / f"{dataset.split('/')[0]}.json"


def load_prompts(path: str | Path) -> Prompts:
    """Reads and checks a prompt file; a file a person wrote gets one clear error per mistake."""
    path = Path(path)
    usage = (
        'a JSON object with "pairs": {"<label>": ["<positive>", "<negative>"], ...} or '
        '"classes": {"<class>": ["<prompt>", ...], ...}'
    )
    if not path.is_file():
        raise PromptError(
            f"prompt file {path} does not exist: pass --config.prompts=FILE.json, {usage} "
            f"(shipped ones: {PROMPTS_DIR})"
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PromptError(f"prompt file {path} is not valid JSON ({err}): write {usage}") from None
    if not isinstance(content, dict):
        raise PromptError(f"prompt file {path} is not {usage}")
    cross = content.get("cross_modal")
    if cross is not None and not isinstance(cross, dict):
        raise PromptError(f'prompt file {path}: "cross_modal" must be an object like the file')
    return dataclasses.replace(
        _parse(content, path, usage),
        cross_modal=_parse(cross, path, usage) if cross is not None else None,
    )


def _parse(content: dict, path: Path, usage: str) -> Prompts:
    pairs, classes = content.get("pairs", {}), content.get("classes", {})
    ok_pairs = isinstance(pairs, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) and s for s in v)
        for v in pairs.values()
    )
    ok_classes = isinstance(classes, dict) and all(
        _prompt_list(v) or _template(v) for v in classes.values()
    )
    if not ok_pairs or not ok_classes or not (pairs or classes):
        raise PromptError(
            f"prompt file {path} is not {usage} (or, for a class, GLoRIA's template parts: "
            '{"severity": [...], "subtype": [...], "location": [...]}), with non-empty prompts'
        )
    return Prompts(
        path,
        {k: (v[0], v[1]) for k, v in pairs.items()},
        {k: expand(v) for k, v in classes.items()},
    )


def _prompt_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(s, str) and s.strip() for s in value)
    )


def _template(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, list) and v and all(isinstance(s, str) for s in v)
                for v in value.values())
        and bool(expand(value))
    )  # fmt: skip


def expand(value: list[str] | dict[str, list[str]]) -> tuple[str, ...]:
    """A class's prompts: a list as given, or GLoRIA's template parts (generate_chexpert_class_
    prompts) as every combination joined with spaces in the order of the parts (all of them,
    where GLoRIA samples some); spaces collapsed, repeats dropped."""
    if isinstance(value, list):
        combos = [[s] for s in value]
    else:
        combos = [[]]
        for part in value.values():
            combos = [[*c, s] for c in combos for s in part]
    return tuple(dict.fromkeys(filter(None, (" ".join(" ".join(c).split()) for c in combos))))


def label_names(dataset: str) -> tuple[str, ...]:
    """The names of a dataset's label columns, in column order, from its builder module."""
    spec, _ = builders.parse_name(dataset)
    return tuple(getattr(spec.load(), _LABEL_NAMES.get(spec.name, "CLASS_NAMES")))


def label_columns(names: Sequence[str], labels: Sequence[str], path: Path) -> list[int]:
    """The column of each prompted name among the dataset's ``labels``."""
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise PromptError(
            f"prompt file {path} names {unknown}, which are not labels of this dataset; its "
            f"labels: {list(labels)}"
        )
    return [list(labels).index(n) for n in names]
