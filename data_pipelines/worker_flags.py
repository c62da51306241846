"""A workaround for grain's worker processes, which read absl flags at start.

Outside an absl app (tests, scripts, notebooks) the flags were never parsed, and a worker would
fail reading them; marking them parsed gives the workers their defaults.
"""

from __future__ import annotations

from absl import flags


def ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app, use their defaults.

    Marked parsed rather than parsed: parsing would run the validators of flags other modules
    define (e.g. a required --workdir), which have no value outside their own app.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
