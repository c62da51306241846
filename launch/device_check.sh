#!/usr/bin/env bash
# The GPU checks in one run of about 8 minutes, for a session with a device machine
# (docs/benchmarks.md, "Train step on GPU"):
#   1. one train step of the paper config (ViT-B/16, 224x224 and 32x128x128, k=4) at batch 4 + 2
#      on the CPU (float32) and on the GPU (compute dtype auto: bfloat16 on A100/H100); the GPU's
#      total loss must be within 1e-2 (relative) of the CPU's;
#   2. python -m unimedi_jax.benchmark on the paper config at batch 4 + 2 and on the demo preset,
#      each beside the PyTorch peer step at the same shapes when PEER names its file
#      (../shared/bench/torch_peer_step.py, copied into build/peer: it is not part of the project);
#   3. the benchmark at the whole paper batch on one GPU (96 + 48; 48 + 24 if that does not fit),
#      for MFU.
# Results go to $OUT (default runs/device_check): summary.md (tables), log.txt (everything),
# step_cpu.json and step_gpu.json. Exit status 1 if any part failed.
#
#   launch/device_check.sh fetch   here, once, with PyPI: the wheels the device image lacks
#   launch/device_check.sh         on the device machine: device tool run with
#                                  command="bash launch/device_check.sh",
#                                  carry=["build/device_wheels", "build/peer"],
#                                  PEER=build/peer/torch_peer_step.py, timeout_s=580
#   DRY_RUN=1 launch/device_check.sh
#                                  on a CPU: the tiny config, both steps on the CPU (the second
#                                  in bfloat16), 2 timed benchmark steps: all but the GPU itself
#
# fetch downloads (CPython 3.12, x86-64 Linux, the versions installed here) the project's
# dependencies that the device image does not hold into build/device_wheels (ignored by git);
# the run installs them into /tmp/site. The image's own jax, flax, optax and orbax are used.
# Env: PYTHON (default python3), OUT, TOTAL_S (time budget of the run, default 500), PEER (the
# peer step's file; without it the peer is not run).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
wheels=build/device_wheels
# Imported by unimedi_jax.benchmark but missing from the device image (its package list in the
# device tool's notes, 2026-11-17).
missing=(array-record googleapis-common-protos grain immutabledict ml-collections nibabel
  portpicker promise pydicom tensorboardX tensorflow-datasets tensorflow-metadata toml)

if [[ ${1:-} == fetch ]]; then
  mkdir -p "$wheels"
  for name in "${missing[@]}"; do
    version=$("$python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
    platforms=()
    for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
      platforms+=(--platform "${tag}_x86_64")
    done
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d "$wheels" "$name==$version" ||
      "$python" -m pip wheel --quiet --no-deps -w "$wheels" "$name==$version" # pure-Python sdist
  done
  ls "$wheels" && du -sh "$wheels"
  exit 0
fi

out=${OUT:-runs/device_check}
mkdir -p "$out"
summary=$out/summary.md
log=$out/log.txt
: >"$summary"
: >"$log"
deadline=$((SECONDS + ${TOTAL_S:-500}))
failed=()

# phase NAME SECONDS CMD...: runs CMD under the smaller of SECONDS and the time left; its stdout
# goes to the summary and the log, its stderr to the log. Returns CMD's status.
phase() {
  local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS
  shift 2
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  if ((limit > 0)) && timeout "$limit" "$@" 2>>"$log" | tee -a "$summary" "$log"; then
    echo "== $name: ok in $((SECONDS - start))s" | tee -a "$log"
    return 0
  fi
  echo "== $name: FAILED after $((SECONDS - start))s" | tee -a "$log" "$summary"
  return 1
}

if [[ -n ${DRY_RUN:-} ]]; then
  config=configs/pretrain.py:tiny
  accelerator=(env JAX_PLATFORMS=cpu)
  accelerator_flags=(--config.precision.compute_dtype=bfloat16)
  steps=2
  peer_device=cpu
else
  config=configs/pretrain.py
  accelerator=(env)
  accelerator_flags=()
  steps=10
  peer_device=cuda
  if [[ -d $wheels ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheels"/*.whl >>"$log" 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONUNBUFFERED=1

{
  echo "# device check $(date -u +%Y-%m-%dT%H:%MZ), config $config"
  echo
  nvidia-smi -L 2>/dev/null || true
} | tee -a "$summary"
phase environment 120 "${accelerator[@]}" "$python" -c '
import sys, importlib.metadata as m, jax
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "protobuf")
print(f"python {sys.version.split()[0]}, " + ", ".join(f"{n} {m.version(n)}" for n in names))
print(f"devices: {jax.devices()}")
' || true

check=(--config="$config" --config.batch.size_2d=4 --config.batch.size_3d=2)
if phase step_cpu 180 env JAX_PLATFORMS=cpu "$python" -m unimedi_jax.device_check "${check[@]}" \
  --out="$out/step_cpu.json"; then
  phase step_accelerator 150 "${accelerator[@]}" "$python" -m unimedi_jax.device_check \
    "${check[@]}" "${accelerator_flags[@]}" --reference="$out/step_cpu.json" \
    --out="$out/step_gpu.json" || failed+=(step_accelerator)
else
  failed+=(step_cpu)
fi

# bench NAME SECONDS --config=... [--config.X=Y ...]: our step's benchmark (its --config first).
bench() {
  local name=$1 limit=$2
  shift 2
  phase "$name" "$limit" "${accelerator[@]}" "$python" -m unimedi_jax.benchmark --steps="$steps" \
    "$@" "${accelerator_flags[@]}"
}
paper=(--config="$config" --config.text.vocab_size=28996)
# peer PRESET: the PyTorch step at the shapes of the project's PRESET (its samples/s beside ours).
peer() {
  [[ -n ${PEER:-} ]] || return 0
  phase "peer_$1" 120 "$python" "$PEER" --preset "$1" --device "$peer_device" --steps "$steps"
}
bench bench_paper_4_2 150 "${paper[@]}" --config.batch.size_2d=4 \
  --config.batch.size_3d=2 || failed+=(bench_paper_4_2)
if [[ -n ${DRY_RUN:-} ]]; then  # the peer's paper shapes take minutes per step on a CPU
  echo "peer_project_paper: not run on a CPU (DRY_RUN)" | tee -a "$summary"
else
  peer project_paper || failed+=(peer_project_paper)
fi
bench bench_demo 120 --config=configs/pretrain.py:demo || failed+=(bench_demo)
peer project_demo || failed+=(peer_project_demo)
bench bench_paper_batch 150 "${paper[@]}" --config.batch.size_2d=96 \
  --config.batch.size_3d=48 ||
  bench bench_half_paper_batch 150 "${paper[@]}" --config.batch.size_2d=48 \
    --config.batch.size_3d=24 || failed+=(bench_larger_batch)

if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" | tee -a "$summary"
  exit 1
fi
echo "all parts passed" | tee -a "$summary"
