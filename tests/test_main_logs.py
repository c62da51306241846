"""Every command keeps libraries' INFO lines out of its output and log (``run_app``)."""

from __future__ import annotations

import logging

from absl import logging as absl_logging

from unimedi_jax.core import app


def record(level: int, pathname: str) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_library_info_is_filtered_ours_and_warnings_are_not():
    handler = absl_logging.get_absl_handler().python_handler
    before = list(handler.filters)
    try:
        app.quiet_library_logs()
        shown = lambda level, path: bool(handler.filter(record(level, path)))
        library = "/venv/lib/python3.11/site-packages/tensorflow_datasets/core/dataset_info.py"
        assert not shown(logging.INFO, library)
        assert shown(logging.WARNING, library) and shown(logging.ERROR, library)
        assert shown(logging.INFO, "/src/unimedi_jax/train/loop.py")
        assert shown(logging.INFO, "/src/data_pipelines/prepare.py")
    finally:
        handler.filters[:] = before
