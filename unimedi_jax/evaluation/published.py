"""The field's published figures of a benchmark: ``configs/published/<benchmark>.json`` read
and checked.

Figures are data, not code, so that each keeps the source it was read from: a file names its
``sources`` (what, where, and the exact line read) and lists, per table (``zero_shot``,
``report_to_volume``), rows of a method, its figures as fractions and the sources that report
them. A figure without a source cannot be entered: reading the file refuses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from unimedi_jax.core.errors import UserError
from unimedi_jax.core.overrides import packaged_config_dir

PUBLISHED_DIR = packaged_config_dir() / "published"  # configs/published, in a checkout or a wheel
_SOURCE_FIELDS = ("what", "where", "line")


class PublishedError(UserError, ValueError):
    """A published-figures file that is malformed or holds a figure without a source."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where figures were read: what it is, where it lives, and the exact line read."""

    key: str
    what: str
    where: str
    line: str


@dataclasses.dataclass(frozen=True)
class Row:
    """A method's published figures (fractions), with the keys of the sources reporting them."""

    method: str
    figures: dict[str, float]
    sources: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Published:
    """A benchmark's published rows, per table, and their sources."""

    path: Path
    split: str
    note: str
    sources: dict[str, Source]
    tables: dict[str, tuple[Row, ...]]

    def rows(self, table: str) -> tuple[Row, ...]:
        return self.tables.get(table, ())


def published_path(benchmark: str) -> Path:
    """The shipped file of a benchmark: configs/published/<benchmark>.json."""
    return PUBLISHED_DIR / f"{benchmark}.json"


def load_published(path: str | Path) -> Published:
    """Reads and checks a published-figures file (PublishedError naming the file and entry)."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PublishedError(f"published figures {path} cannot be read: {err}") from None
    if not isinstance(content, dict) or not isinstance(content.get("tables"), dict):
        raise PublishedError(f'published figures {path}: expected an object with "tables"')
    sources = {
        key: _source(path, key, value) for key, value in (content.get("sources") or {}).items()
    }
    tables = {
        name: tuple(_row(path, name, row, sources) for row in rows)
        for name, rows in content["tables"].items()
    }
    return Published(path, str(content.get("split", "")), str(content.get("note", "")), sources,
                     tables)  # fmt: skip


def _source(path: Path, key: str, value: Any) -> Source:
    if not isinstance(value, dict) or not all(
        isinstance(value.get(f), str) and value[f].strip() for f in _SOURCE_FIELDS
    ):
        raise PublishedError(
            f"published figures {path}: source {key!r} needs {', '.join(_SOURCE_FIELDS)} "
            "(what it is, where it lives, the exact line read)"
        )
    return Source(key, value["what"], value["where"], value["line"])


def _row(path: Path, table: str, row: Any, sources: dict[str, Source]) -> Row:
    where = f"published figures {path}, table {table!r}"
    if not isinstance(row, dict) or not isinstance(row.get("method"), str):
        raise PublishedError(f'{where}: every row needs a "method"')
    keys = row.get("source")
    if not isinstance(keys, list) or not keys:
        raise PublishedError(
            f"{where}: {row['method']!r} has no source; a figure is entered only with the "
            'sources it was read from ("source": [keys of "sources"])'
        )
    unknown = [k for k in keys if k not in sources]
    if unknown:
        raise PublishedError(f"{where}: {row['method']!r} cites {unknown}, not in its sources")
    figures = {k: v for k, v in row.items() if k not in ("method", "source")}
    bad = [
        k
        for k, v in figures.items()
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= 1
        or math.isnan(v)
    ]  # fmt: skip
    if not figures or bad:
        raise PublishedError(
            f"{where}: {row['method']!r} needs its figures as fractions in [0, 1]; bad: {bad}"
        )
    return Row(row["method"], {k: float(v) for k, v in figures.items()}, tuple(keys))
