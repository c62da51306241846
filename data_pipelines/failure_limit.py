"""How much unusable input a dataset may hold before it is refused.

A few damaged files are normal in hospital exports and are skipped; a dataset where many fail
points at a broken download or a wrong layout, and training on the remainder would quietly
give a worse model. The builders (per split, at the end of a build) and the training pipeline
(per source, as records are read) apply the same rule: once `min_count` inputs were seen, more
than `max_fraction` of them failing stops with an error naming the dataset and the reasons.

Pure Python; imports neither TFDS nor jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from unimedi_jax.core.errors import UserError

DEFAULT_MAX_FRACTION = 0.1
DEFAULT_MIN_COUNT = 100  # below this, a fraction says more about chance than about the data


class TooManyFailuresError(UserError, ValueError):
    """More of a dataset was unusable than the configured fraction allows."""


@dataclasses.dataclass(frozen=True)
class FailureLimit:
    """At most `max_fraction` of the inputs may fail, judged once `min_count` were seen."""

    max_fraction: float = DEFAULT_MAX_FRACTION
    min_count: int = DEFAULT_MIN_COUNT

    def check(self, dataset: str, failures: Mapping[str, int], seen: int, remedy: str) -> None:
        """Raise TooManyFailuresError when `failures` (reason -> count) of `seen` is too many."""
        failed = sum(failures.values())
        if seen < self.min_count or failed <= self.max_fraction * seen:
            return
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(failures.items()) if n)
        raise TooManyFailuresError(
            f"{dataset}: {failed} of {seen} inputs ({failed / seen:.0%}) were unusable "
            f"({reasons}), more than the allowed {self.max_fraction:.0%}. {remedy}"
        )
