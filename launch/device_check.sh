#!/usr/bin/env bash
# The GPU check in one run of at most 9 minutes on one H100 or H200 (docs/benchmarks.md, "GPU
# check"), most important part first:
#   1. the GPU-only tests (cuDNN against XLA attention in bfloat16, tests/test_vit.py);
#   2. one train step of the paper config at batch 4 + 2 on the GPU (compute dtype auto:
#      bfloat16) against the same step on the CPU (float32, run in the background from the start);
#      the total losses must agree within 1e-2 (relative);
#   3. python -m unimedi_jax.benchmark at the paper config, each variant worth comparing (the
#      default: auto attention, i.e. cuDNN, scanned layers, no remat; XLA attention; unrolled
#      layers; remat dots) at 96 + 48, or 64 + 32 or 48 + 24 where that does not fit: the table
#      says which;
#   4. the PyTorch yardstick (PEER) at the batch of our default variant, --amp bf16, without and
#      with --compile;
#   5. a per-op profile of our fastest variant, XLA's command buffers off so that each kernel
#      keeps its name, summed per part of the step;
#   6. one summary table: card, jax, torch, every time and samples/s side by side.
# Results go to $OUT (default runs/device_check): summary.md, log.txt, step_cpu.json,
# step_gpu.json, variants.json, peer.jsonl, profile.md. Exit status 1 if any part failed.
#
#   launch/device_check.sh fetch   here, once, with PyPI: the wheels the device image lacks, and
#                                  the peer copied from ../shared/bench into build/peer
#   launch/device_check.sh         on the device machine: device tool run with
#                                  command="bash launch/device_check.sh",
#                                  carry=["build/device_wheels", "build/peer"], timeout_s=590
#   DRY_RUN=1 launch/device_check.sh
#                                  on a CPU, every part at the tiny config, 1 timed step, one
#                                  variant, the peer (when PEER is set) without --compile
#
# Env: PYTHON (default python3), OUT, TOTAL_S (the run's budget, default 530 s; DRY_RUN: 4 times
# that and each part's limit), PEER (the peer step's file; default build/peer/torch_peer_step.py
# where it exists; empty: the peer is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
wheels=build/device_wheels
# Imported by unimedi_jax.benchmark but missing from the device image (its package list in the
# device tool's notes, 2026-11-17).
missing=(array-record googleapis-common-protos grain immutabledict ml-collections nibabel
  portpicker promise pydicom tensorboardX tensorflow-datasets tensorflow-metadata toml)

if [[ ${1:-} == fetch ]]; then
  mkdir -p "$wheels" build/peer
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
  # The peer is not part of the project. Older copies made their CLIP labels on the CPU, which
  # stops them on a GPU: the copy gets them on the images' device.
  sed 's/torch\.arange(len(img))/torch.arange(len(img), device=img.device)/' \
    ../shared/bench/torch_peer_step.py >build/peer/torch_peer_step.py
  ls "$wheels" build/peer && du -sh "$wheels"
  exit 0
fi

out=${OUT:-runs/device_check}
mkdir -p "$out"
summary=$out/summary.md
log=$out/log.txt
: >"$summary"
: >"$log"
: >"$out/peer.jsonl"
# A CPU's dry run compiles slower than the device machine's host: longer limits.
scale=$((${DRY_RUN:+4}+0))
((scale)) || scale=1
deadline=$((SECONDS + ${TOTAL_S:-$((530 * scale))}))
failed=()
peer=${PEER-}
[[ -z ${PEER+set} && -f build/peer/torch_peer_step.py ]] && peer=build/peer/torch_peer_step.py

# phase NAME SECONDS CMD...: runs CMD under the smaller of SECONDS and the time left; its stdout
# goes to the summary and the log, its stderr to the log. Returns CMD's status.
phase() {
  local name=$1 limit=$(($2 * scale)) left=$((deadline - SECONDS)) start=$SECONDS
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

paper=(--config=configs/pretrain.py --config.text.vocab_size=28996)
if [[ -n ${DRY_RUN:-} ]]; then
  config=(--config=configs/pretrain.py:tiny)
  accelerator=(env JAX_PLATFORMS=cpu)
  accelerator_flags=(--config.precision.compute_dtype=bfloat16)
  check=("${config[@]}" --config.batch.size_2d=4 --config.batch.size_3d=2)
  bench=("${config[@]}")
  batches=8x8,4x4
  variants=(--variant=remat=dots)
  steps=1
  peer_args=(--preset project_demo --device cpu --amp bf16 --steps 1)
else
  accelerator=(env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)
  accelerator_flags=()
  check=("${paper[@]}" --config.batch.size_2d=4 --config.batch.size_3d=2)
  bench=("${paper[@]}")
  batches=96x48,64x32,48x24
  # The default (auto: cuDNN attention in bfloat16) against each change worth comparing.
  variants=(--variant=config --variant=attention=xla --variant=unroll_layers=true
    --variant=remat=dots)
  steps=5
  peer_args=(--preset project_paper --device cuda --amp bf16 --steps "$steps")
  if [[ -d $wheels ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheels"/*.whl >>"$log" 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONUNBUFFERED=1

{
  echo "# device check $(date -u +%Y-%m-%dT%H:%MZ)${DRY_RUN:+ (DRY_RUN: tiny config, CPU)}"
  echo
  nvidia-smi -L 2>/dev/null || true
} | tee -a "$summary"

# The CPU's float32 step runs beside the GPU's parts (it needs the CPU's cores only).
JAX_PLATFORMS=cpu timeout $((300 * scale)) "$python" -m unimedi_jax.device_check "${check[@]}" \
  --out="$out/step_cpu.json" >>"$log" 2>&1 &
cpu_step=$!

phase environment 60 "${accelerator[@]}" "$python" -c '
import sys, importlib.metadata as m, jax
names = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")
found = {}
for n in names:
    try:
        found[n] = m.version(n)
    except m.PackageNotFoundError:
        found[n] = "absent"
print(f"python {sys.version.split()[0]}, " + ", ".join(f"{n} {v}" for n, v in found.items()))
print(f"devices: {jax.devices()}")
' || true

phase gpu_tests 90 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$python" -m pytest -q -rs -n 0 \
  -p no:cacheprovider tests/test_vit.py -k "cudnn or full_precision" || failed+=(gpu_tests)

if wait "$cpu_step"; then
  phase step_accelerator 120 "${accelerator[@]}" "$python" -m unimedi_jax.device_check \
    "${check[@]}" "${accelerator_flags[@]}" --reference="$out/step_cpu.json" \
    --out="$out/step_gpu.json" || failed+=(step_accelerator)
else
  echo "== step_cpu: FAILED (log.txt)" | tee -a "$summary"
  failed+=(step_cpu)
fi

phase variants 270 "${accelerator[@]}" "$python" -m unimedi_jax.benchmark "${bench[@]}" \
  "${accelerator_flags[@]}" --steps="$steps" --batches="$batches" "${variants[@]}" \
  --json="$out/variants.json" || failed+=(variants)

# pick FIELD: the default variant's batch ("B2,B3") or the fastest variant's config flags.
pick() {
  "$python" - "$out/variants.json" "$1" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r["batch"]]
if sys.argv[2] == "batch":
    print(",".join(map(str, rows[0]["batch"])))
else:
    r = max(rows, key=lambda r: r["samples_per_s"])
    print(f"--config.model.attention={r['attention']} --config.model.remat={r['remat']} "
          f"--config.model.unroll_layers={r['layers'] == 'unrolled'} "
          f"--config.batch.size_2d={r['batch'][0]} --config.batch.size_3d={r['batch'][1]}")
EOF
}

if [[ -n $peer ]] && batch=$(pick batch 2>>"$log"); then
  for compile in "" --compile; do
    [[ -n $compile && -n ${DRY_RUN:-} ]] && continue # torch.compile takes minutes on a CPU
    phase "peer${compile:+_compile}" 180 bash -c '"$@" | tee -a "'"$out/peer.jsonl"'"' _ \
      "$python" "$peer" "${peer_args[@]}" --batch "$batch" $compile ||
      failed+=("peer${compile}")
  done
else
  echo "peer: not run (PEER unset or no variant ran)" | tee -a "$summary"
fi

if best=$(pick best 2>>"$log"); then
  # shellcheck disable=SC2086 # $best is several flags
  phase profile 150 "${accelerator[@]}" XLA_FLAGS=--xla_gpu_enable_command_buffer= \
    "$python" -m unimedi_jax.profile_step "${bench[@]}" "${accelerator_flags[@]}" $best \
    --steps=2 --top=12 --out=/tmp/device_check_profile || failed+=(profile)
  cp /tmp/device_check_profile/profile.md "$out/" 2>/dev/null || true
fi

"$python" - "$out" <<'EOF' | tee -a "$summary"
import importlib.metadata as m, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "absent"
card = "?"
try:
    import jax
    card = jax.devices()[0].device_kind
except Exception as error:  # the table is still worth printing
    card = f"unknown ({error})"
print(f"\n## Summary: {card}, jax {version('jax')}, torch {version('torch')}\n")
print("| step | batch | step s | samples/s | TFLOP/s | MFU | note |\n|---|---|---|---|---|---|---|")
rows = json.loads((out / "variants.json").read_text()) if (out / "variants.json").exists() else []
for r in rows:
    name = f"ours: {r['attention']}, remat {r['remat']}, {r['layers']}"
    if not r["batch"]:
        print(f"| {name} | none fits | | | | | |")
        continue
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    tflops = "n/a" if r["tflops"] is None else f"{r['tflops']:.1f}"
    note = f"compile {r['compile_s']:.0f} s" + (f", program {r['program_gib']:.1f} GiB" if r["program_gib"] else "")
    print(f"| {name} | {r['batch'][0]} + {r['batch'][1]} | {r['step_s']:.3f} | "
          f"{r['samples_per_s']:.1f} | {tflops} | {mfu} | {note} |")
peers = [json.loads(line) for line in (out / "peer.jsonl").read_text().splitlines() if line.startswith("{")]
for p in peers:
    name = f"PyTorch: amp {p['amp'] or 'none'}{', compile' if p['compile'] else ''}"
    peak = f"peak {p['peak_gib']:.1f} GiB" if p.get("peak_gib") else ""
    print(f"| {name} | {p['batch'][0]} + {p['batch'][1]} | {p['step_s']:.3f} | "
          f"{p['samples_per_s']:.1f} | | | {peak} |")
fitted = [r for r in rows if r["batch"]]
if fitted and peers:
    ours, theirs = max(fitted, key=lambda r: r["samples_per_s"]), max(peers, key=lambda p: p["samples_per_s"])
    same = list(ours["batch"]) == list(theirs["batch"])
    print(f"\nbest ours / best PyTorch: {ours['samples_per_s'] / theirs['samples_per_s']:.2f}x"
          + ("" if same else " (at different batches)"))
if (out / "step_gpu.json").exists() and (out / "step_cpu.json").exists():
    gpu, cpu = (json.loads((out / f"step_{d}.json").read_text())["loss"] for d in ("gpu", "cpu"))
    print(f"\nstep loss, accelerator {gpu:.6g} against CPU float32 {cpu:.6g}: relative error "
          f"{abs(gpu - cpu) / abs(cpu):.2e} (limit 1e-2)")
EOF

if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" | tee -a "$summary"
  exit 1
fi
echo "all parts passed" | tee -a "$summary"
