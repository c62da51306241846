"""Transparent huge pages for XLA:CPU's per-step buffers (docs/benchmarks.md, "Host memory").

XLA:CPU allocates a step's temporaries (625 MB at the demo's shapes) as one block per call;
glibc maps it fresh from the kernel and unmaps it afterwards, so every step faults ~160,000
4 KiB pages back in: a fifth of the demo step's CPU time. With glibc's tunable
``glibc.malloc.hugetlb=1`` malloc asks for transparent huge pages instead (about 700 faults a
step, the step ~25% faster on our 2-core VM). glibc reads tunables only when a process starts,
so the commands re-execute themselves once with it set (``UNIMEDI_HUGE_PAGES=0`` opts out).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "UNIMEDI_HUGE_PAGES"  # "0": keep the process as started
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether this process started with malloc asking for huge pages."""
    environ = os.environ if environ is None else environ
    return f"{TUNABLE}=" in environ.get("GLIBC_TUNABLES", "")


def _kernel_offers_huge_pages() -> bool:
    """Transparent huge pages exist and are not switched off ('[never]')."""
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


def restart_with_huge_pages() -> None:
    """Re-executes this command (same interpreter, same arguments) with malloc asking for huge
    pages, unless it already does, opted out, or the platform has no such tunable (not Linux
    with glibc, or transparent huge pages off). Call before JAX is imported and before any
    side effect: the process image is replaced, the pid stays."""
    if (
        sys.platform != "linux"
        or platform.libc_ver()[0] != "glibc"
        or os.environ.get(OPT_OUT, "1") == "0"
        or huge_pages_requested()
        or not _kernel_offers_huge_pages()
    ):
        return
    tunables = os.environ.get("GLIBC_TUNABLES")
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, f"{TUNABLE}=1"))))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
