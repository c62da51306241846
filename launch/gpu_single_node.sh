#!/usr/bin/env bash
# UniMedI pre-training on one GPU machine: one process driving every GPU it can see.
#
#   launch/gpu_single_node.sh --config=configs/pretrain.py --workdir=runs/paper
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu_single_node.sh --config=configs/pretrain.py:demo \
#       --workdir=runs/demo-gpu
#
# Expects: NVIDIA GPUs with a driver, the project's environment active (or PYTHON=/path/to/python)
# and installed with the cuda extra (pip install -e '.[cuda]'). Uses the GPUs CUDA_VISIBLE_DEVICES
# names, else all. Arguments go to python -m unimedi_jax.main unchanged; the same command with
# the same workdir resumes from the latest checkpoint.
set -euo pipefail

python=${PYTHON:-python}
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | wc -l)
else
  gpus=$(nvidia-smi -L | wc -l)
fi
if ((gpus == 0)); then
  echo "no GPU found (nvidia-smi -L lists none)" >&2
  exit 1
fi
# Inside a SLURM job step JAX would otherwise keep one GPU per process; harmless elsewhere.
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
export JAX_LOCAL_DEVICE_IDS
exec "$python" -m unimedi_jax.main "$@"
