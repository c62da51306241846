"""``python -m unimedi_jax.main`` with a stop at a chosen moment, for the kill tests.

    UNIMEDI_PAUSE=save:4 UNIMEDI_PAUSE_MARKER=/tmp/m python tests/pause_driver.py --config=...

UNIMEDI_PAUSE picks the moment; on reaching it the driver writes UNIMEDI_PAUSE_MARKER:
  batch:N  before reading the batch of step N, it sleeps until killed (between checkpoint
           writes: the saves of the earlier steps go on in the background);
  save:N   inside the save of step N, with every file written to orbax's temporary directory but
           not yet renamed into place, it sleeps until killed (a kill now leaves a half-written
           checkpoint);
  term:N   before the batch of step N, it sends itself SIGTERM (a preemption notice at step N).
Not a test module: a subprocess the tests start (orbax's rename step is private API, and only
this test driver patches it).
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

from orbax.checkpoint._src.path import atomicity

from data_pipelines.train_stream import TrainStream

KIND, STEP = os.environ["UNIMEDI_PAUSE"].split(":")
STEP = int(STEP)
MARKER = Path(os.environ["UNIMEDI_PAUSE_MARKER"])


def reached() -> None:
    MARKER.write_text(f"{KIND}:{STEP}")
    if KIND != "term":
        time.sleep(3600)  # until the test kills the process


_next = TrainStream.__next__


def _next_with_pause(self):
    if self._step == STEP - 1 and KIND in ("batch", "term"):
        reached()
        if KIND == "term":
            os.kill(os.getpid(), signal.SIGTERM)
    return _next(self)


_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _finalize_with_pause(self, *args, **kwargs):
    if KIND == "save" and self.get_final().name == str(STEP):
        reached()
    return await _finalize(self, *args, **kwargs)


TrainStream.__next__ = _next_with_pause
atomicity.AtomicRenameTemporaryPath.finalize = _finalize_with_pause
sys.argv = ["unimedi_jax.main", *sys.argv[1:]]
runpy.run_module("unimedi_jax.main", run_name="__main__", alter_sys=True)
