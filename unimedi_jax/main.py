"""Entry point of every trainer; it dispatches on the config's ``kind`` (``trainers/by_kind.py``).

    python -m unimedi_jax.main --config=configs/pretrain.py[:preset] --workdir=DIR
    python -m unimedi_jax.main --config=configs/finetune.py:dataset=NAME --workdir=RUN \
        --out=DIR

Pre-training initialises multi-host JAX when running under a cluster (or when the coordinator
flags are given) and resumes a workdir that already holds checkpoints. Fine-tuning prints a JSON
summary of its ``eval.json``. A run stopped by SIGTERM/SIGINT exits 143.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from unimedi_jax.core.app import run_app
from unimedi_jax.core.paths import define_path
from unimedi_jax.train.preemption import Preempted
from unimedi_jax.trainers import by_kind

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a job stopped by SIGTERM

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/pretrain.py:demo", lock_config=True
)
_WORKDIR = define_path(
    "workdir",
    "The run to train or continue (checkpoints, metrics); fine-tuning: the pre-training run "
    "(its latest checkpoint) or <run>/checkpoints/<step> to start from.",
)
_OUT = define_path("out", "Fine-tuning only: the new folder of the fine-tuning run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside SLURM/TPU."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() under SLURM/Open MPI/TPU pods or with explicit flags."""
    if _COORDINATOR.value is not None:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    else:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as err:
            # Not under a cluster JAX recognises: a single-process run.
            logging.debug("single process run (%s)", err)
    logging.info(
        "process %d/%d, %d local devices, %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )


def main(argv: list[str]) -> None:
    del argv
    maybe_initialize_distributed()
    try:
        summary = by_kind.run(_CONFIG.value, _WORKDIR.value, _OUT.value)
    except Preempted as stop:
        logging.warning("%s", stop)
        sys.exit(EXIT_PREEMPTED)
    if summary is not None:
        print(json.dumps(summary))


def cli() -> None:
    """The command, for ``python -m`` and the console script (pyproject.toml) alike."""
    run_app(main)


if __name__ == "__main__":
    cli()
