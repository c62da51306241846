#!/usr/bin/env bash
# N local JAX processes on one machine, talking over 127.0.0.1 with gloo CPU collectives: a
# multi-host run in miniature (what tests/test_multiprocess.py runs). No accelerator needed.
#
#   launch/cpu_multiprocess.sh N [flags for python -m unimedi_jax.main]
#   launch/cpu_multiprocess.sh 2 --config=configs/pretrain.py:tiny --workdir=/tmp/run
#
# Expects: bash >= 5.1, the project installed (pip install -e .) and its environment active, or
# PYTHON=/path/to/python. Each process fakes DEVICES_PER_PROCESS CPU devices (default 2) through
# XLA_FLAGS; the coordinator listens on PORT (default: a free port). Output lines carry the
# process index ("[1] ..."). If a process fails, the others are killed and the script exits
# with its status; on Ctrl-C or SIGTERM every process checkpoints and exits (status 143).
# Arguments after N go to python -m unimedi_jax.main unchanged.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [flags for python -m unimedi_jax.main]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-2}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"

pids=()
declare -A rank # pid -> process index
signal_all() {
  for pid in "${pids[@]}"; do
    kill "-$1" "$pid" 2>/dev/null || true
  done
}
# Ctrl-C or SIGTERM: every process checkpoints at the same step and exits (status 143).
trap 'signal_all TERM; wait; exit 143' INT TERM

for ((i = 0; i < num_processes; i++)); do
  "$python" -m unimedi_jax.main \
    --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" \
    --process_id="$i" \
    "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
  rank[$!]=$i
done

result=0
while ((${#pids[@]} > 0)); do
  status=0
  wait -n -p finished "${pids[@]}" || status=$?
  for index in "${!pids[@]}"; do
    if [[ ${pids[index]} == "$finished" ]]; then unset "pids[index]"; fi
  done
  if ((status == 143)); then
    result=143 # stopped by a signal after checkpointing: the others stop with it
  elif ((status != 0)); then
    echo "process ${rank[$finished]} exited with status $status; killing the others" >&2
    signal_all KILL # they would wait for it in their next collective
    exit "$status"
  fi
done
exit "$result"
