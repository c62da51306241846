#!/usr/bin/env bash
# UniMedI pre-training on a Cloud TPU VM (one host or a pod slice): the same command on every
# worker at once, one process per worker driving its TPU chips.
#
#   TPU_NAME=unimedi-v4-32 ZONE=us-central2-b launch/tpu_vm.sh \
#       --config=configs/pretrain.py --workdir=/mnt/shared/runs/paper
#
# Expects, on the machine running this script: gcloud, authenticated, with access to the TPU
# (PROJECT sets --project, else gcloud's default). On every worker: this repository at REPO_DIR
# (default ~/unimedi-jax) with a virtual environment at VENV (default REPO_DIR/.venv) installed
# with the tpu extra (pip install -e '.[tpu]'); the workdir, the data and the text model on a
# filesystem every worker sees (e.g. Filestore NFS or a gcsfuse mount: orbax writes checkpoints
# from all workers). Arguments go to python -m unimedi_jax.main unchanged.
#
# jax.distributed.initialize() finds the other workers through the TPU metadata, so no
# coordinator flags are needed. Output of all workers comes back interleaved; process 0 writes
# metrics.jsonl. The same command with the same workdir resumes from the latest checkpoint.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM's name}"
: "${ZONE:?set ZONE to the TPU VM's zone}"
repo_dir=${REPO_DIR:-'~/unimedi-jax'} # expanded on the workers
venv=${VENV:-$repo_dir/.venv}

project=()
if [[ -n ${PROJECT:-} ]]; then
  project=(--project="$PROJECT")
fi

# Quote the arguments once here so each worker's shell sees them exactly as given.
remote="cd $repo_dir && source $venv/bin/activate && python -m unimedi_jax.main"
if (($# > 0)); then
  remote+=" $(printf '%q ' "$@")"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker=all \
  --command="$remote"
