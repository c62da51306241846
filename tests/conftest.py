"""Settings every test shares, made before any test module imports JAX.

The tests check behaviour, not the speed of optimised code, so XLA compiles with most of its
optimisations off (``JAX_DISABLE_MOST_OPTIMIZATIONS``: LLVM at -O0, no expensive passes), which
cuts the CPU time of the train step's tests about threefold, and XLA:CPU emits its fusions the
older way (``--xla_cpu_use_fusion_emitters=false``), which compiles the tiny train step in 4 s of
CPU instead of 10 and runs it as fast. Subprocesses that fake several devices set their own
XLA_FLAGS without it (tests/fake_devices.py): there the older emitters left the devices of one
program waiting at different collectives until XLA's timeout (test_train_sharded,
test_fsdp_large). One persistent compilation cache
serves every test of a run, its pytest-xdist workers and every subprocess a test starts (they
inherit this environment), so a program compiled once is loaded afterwards. Both are environment
variables, so a user can still set them otherwise; a test that needs optimised numerics compiles
with explicit options (``jitted.lower(...).compile({...})``).

pytest-xdist hands out whole files in collection order (``--dist=loadfile
--no-loadscope-reorder``); the slowest files are collected first, so that the last minutes of a
run are not one long file on one core while the other core idles.
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
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_cpu_use_fusion_emitters" not in _XLA_FLAGS:
    os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS} --xla_cpu_use_fusion_emitters=false".strip()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# The slowest files on the 2-core machine, slowest first (``pytest --durations=0``, summed per
# file); the rest follow in alphabetical order.
SLOWEST_FILES = (
    "test_train_step.py",
    "test_multiprocess.py",
    "test_device_check.py",
    "test_kill_resume.py",
    "test_user_errors.py",
    "test_fsdp_large.py",
    "test_ablation.py",
    "test_self_contained.py",
    "test_commands.py",
    "test_end_to_end.py",
    "test_everyday_use.py",
    "test_step_benchmark.py",
    "test_downstream.py",
    "test_train_sharded.py",
    "test_zero_shot.py",
    "test_pretrained_text.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    """The slowest files first (``SLOWEST_FILES``), each file's tests in their own order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
