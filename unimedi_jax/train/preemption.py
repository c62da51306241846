"""SIGTERM/SIGINT handling: finish the current step, checkpoint, flush, exit cleanly.

Preemptible nodes send SIGTERM shortly before the kill. The first signal only sets a flag the
loop checks after each step; a second signal restores the default handler and re-raises, so an
impatient user's second Ctrl-C stops the process at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):  # noqa: N818 (a stop, not a fault)
    """The run stopped cleanly on SIGTERM/SIGINT; the message says what was kept and how to go
    on. The commands log it and exit 143."""


class StopRequest:
    """Installed for the duration of a run (a context manager); ``requested`` after a signal."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.requested = name
        logging.warning(
            "%s received: finishing the current step, then checkpointing and exiting "
            "(send it again to exit at once)",
            name,
        )

    def agreed(self) -> bool:
        """True on every process once any process got a signal (they must stop together:
        the checkpoint write is collective)."""
        if jax.process_count() == 1:
            return self.requested is not None
        flags = multihost_utils.process_allgather(np.array(self.requested is not None))
        return bool(np.any(flags))

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
