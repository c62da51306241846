"""Settings every test shares, made before any test module imports JAX.

The tests check behaviour, not the speed of optimised code, so XLA compiles with most of its
optimisations off (``JAX_DISABLE_MOST_OPTIMIZATIONS``: LLVM at -O0, no expensive passes), which
cuts the CPU time of the train step's tests about threefold. One persistent compilation cache
serves every test of a run, its pytest-xdist workers and every subprocess a test starts (they
inherit this environment), so a program compiled once is loaded afterwards. Both are environment
variables, so a user can still set them otherwise; a test that needs optimised numerics compiles
with explicit options (``jitted.lower(...).compile({...})``).
"""

import os
import shutil
import tempfile

# Made by the first pytest process (the one xdist's workers inherit the variable from), removed
# by it at the end: the next run compiles afresh, as CI does.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="unimedi-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
