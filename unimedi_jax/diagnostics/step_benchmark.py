"""Train-step speed of a config: compile time, step time, throughput, FLOPs, MFU, memory.

The library of ``python -m unimedi_jax.benchmark`` (``step_report`` is its whole job). Builds
the real trainer (``pretraining.build_trainer``: same model, optimizer, mesh and shardings as a
run) with a randomly initialised text tower sized from ``config.text``, and feeds it random
batches of the config's shapes, so it needs no data and no Hugging Face weights. (For the paper
config add ``--config.text.vocab_size=28996`` to size the embedding like BioClinicalBERT's.)
One process, all its devices. Markdown tables for docs/benchmarks.md.

FLOPs are what the step's math does, the same for every variant of a config: XLA's cost analysis
of the whole (global) step, lowered with its layer scans unrolled (XLA counts a loop body once)
and XLA's attention (XLA counts nothing for cuDNN's kernel), without remat: the model's FLOPs, not
what a remat policy recomputes. MFU divides the achieved FLOP/s
by the devices' dense bf16 peak (V100: fp16); where the compute dtype is float32 (CPU, V100 by
default) give the float32 peak (``step_report``'s ``peak``, the command's --peak_tflops). Data
time is measured apart from the step: building this process's random host batch, then putting
it on the devices.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from unimedi_jax.config.checks import check_batch_for_mesh, check_mesh, check_model
from unimedi_jax.core import sharding
from unimedi_jax.core.host_memory import huge_pages_requested
from unimedi_jax.core.precision import compute_dtype
from unimedi_jax.models.layers import attention_implementation
from unimedi_jax.text_tower.run_setup import SCRATCH_VOCAB_SIZE, TextTower, scratch_bert_config
from unimedi_jax.trainers.pretraining import build_trainer, count_params

# Dense bf16 (V100: fp16) tensor peak TFLOP/s of one device, matched against the lower-cased
# device kind, first match wins. CPUs have none: MFU is n/a unless --peak_tflops is given.
PEAK_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM
    ("h200", 989.0),
    ("a100", 312.0),
    ("v100", 125.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),  # v5p reports itself as "TPU v5"
)

# The schedules only shape the learning rate, not the work of a step.
SCHEDULE_STEPS, SCHEDULE_WARMUP = 1000, 100


def peak_tflops(device_kind: str) -> float | None:
    """Table peak of one device of this kind, or None when unknown (CPUs)."""
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_TFLOPS if key in kind), None)


def text_tower(config) -> TextTower:
    """A from-scratch BERT of config.text's sizes: no weights or tokenizer needed."""
    bert = scratch_bert_config(config.text, config.text.vocab_size or SCRATCH_VOCAB_SIZE)
    return TextTower(bert, None, None)


def host_batch(config, mesh: jax.sharding.Mesh, vocab_size: int, rng: np.random.Generator):
    """This process's rows of a random global batch with the config's shapes (numpy)."""
    length = config.text.max_length
    batch = {}
    for prefix, size, shape in (
        ("image", config.batch.size_2d, config.model.image_size),
        ("volume", config.batch.size_3d, config.model.volume_size),
    ):
        if size == 0:
            continue
        rows = sharding.process_batch_slice(mesh, size)
        n = rows.stop - rows.start
        batch[prefix] = rng.random((n, *shape), dtype=np.float32)
        batch[f"{prefix}_text_ids"] = rng.integers(1, vocab_size, (n, length), dtype=np.int32)
        batch[f"{prefix}_text_mask"] = np.ones((n, length), np.int32)
    return batch


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of fn(), waiting for any device work it started."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def lowered_flops(lowered) -> float | None:
    """FLOPs of a lowered (global, not yet partitioned) program by XLA's cost analysis."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return flops if flops and flops > 0 else None


def with_unrolled_layers(config):
    """A copy of ``config`` whose layer scans are unrolled (same parameters)."""
    config = config.copy_and_resolve_references()
    config.model.unroll_layers = True
    return config


class StepTiming(NamedTuple):
    params: int
    lower_s: float
    compile_s: float
    step_s: float  # median over the timed steps
    memory: int | None  # peak bytes on a device so far (a high-water mark)
    program_memory: int | None = None  # what XLA's compiled step needs on a device


def device_batch(config, mesh: jax.sharding.Mesh, text: TextTower) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return sharding.global_batch(host_batch(config, mesh, text.config.vocab_size, rng), mesh)


class CompiledStep(NamedTuple):
    trainer: Any  # pretraining.Trainer: its state is the step's first input
    batch: dict[str, jax.Array]
    lowered: Any  # jax.stages.Lowered
    compiled: Any  # jax.stages.Compiled: (state, batch) -> (state, metrics)
    lower_s: float
    compile_s: float


def compile_step(config, mesh: jax.sharding.Mesh, text: TextTower) -> CompiledStep:
    """The real trainer of ``config``, a random batch of its shapes and its step, lowered and
    compiled (timed): what the benchmark times and the step profile traces."""
    trainer = build_trainer(config, text, mesh, SCHEDULE_STEPS, SCHEDULE_WARMUP)
    batch = device_batch(config, mesh, text)
    lowered, lower_s = timed(lambda: trainer.step.lower(trainer.state, batch))
    compiled, compile_s = timed(lowered.compile)
    return CompiledStep(trainer, batch, lowered, compiled, lower_s, compile_s)


def time_step(config, mesh: jax.sharding.Mesh, text: TextTower, steps: int) -> StepTiming:
    """Builds the trainer, compiles its step and times ``steps`` steps after one warm-up."""
    step = compile_step(config, mesh, text)
    compiled, batch = step.compiled, step.batch
    (state, _), _ = timed(lambda: compiled(step.trainer.state, batch))  # warm-up
    times = []
    for _ in range(steps):
        (state, _), seconds = timed(lambda s=state: compiled(s, batch))
        times.append(seconds)
    return StepTiming(
        params=count_params(state.params),
        lower_s=step.lower_s,
        compile_s=step.compile_s,
        step_s=statistics.median(times),
        memory=peak_memory_bytes(),
        program_memory=program_bytes(compiled),
    )


def step_flops(config, text: TextTower) -> float | None:
    """FLOPs of one step over all devices, whichever layer loop, attention kernel and remat policy
    run it: the step with unrolled layers, XLA's attention and no remat, lowered, not compiled.

    (The scanned step's own count would include only one layer of each tower, and cuDNN's
    attention is a custom call that XLA counts nothing for.) The global step is lowered for one
    CPU device, whatever the devices: a program's FLOPs do not depend on where it runs, and some
    backends count none (jax 0.11.2's GPU backend on an H200).
    """
    counted = with_unrolled_layers(config)
    counted.model.update(attention="xla", remat="none")
    one_cpu = sharding.make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    return _lowered_step_flops(counted, one_cpu, text)


def _lowered_step_flops(config, mesh: jax.sharding.Mesh, text: TextTower) -> float | None:
    trainer = build_trainer(config, text, mesh, SCHEDULE_STEPS, SCHEDULE_WARMUP)
    return lowered_flops(trainer.step.lower(trainer.state, device_batch(config, mesh, text)))


def data_seconds(config, mesh: jax.sharding.Mesh, vocab_size: int, steps: int) -> tuple:
    """Median (host batch preparation, host-to-device transfer) seconds per step."""
    rng = np.random.default_rng(1)
    prep, put = [], []
    for _ in range(steps):
        local, seconds = timed(lambda: host_batch(config, mesh, vocab_size, rng))
        prep.append(seconds)
        put.append(timed(lambda b=local: sharding.global_batch(b, mesh))[1])
    return statistics.median(prep), statistics.median(put)


def program_bytes(compiled) -> int | None:
    """Device bytes the compiled step needs (arguments, outputs not aliased to them, temporaries):
    unlike the process's high-water mark, this program's own, where the backend reports it."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def peak_memory_bytes() -> int | None:
    """Largest peak allocation over this process's devices, where the backend reports it."""
    peaks = [
        (device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()
    ]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def report_rows(
    config, timing: StepTiming, flops: float | None, data: tuple, peak: float | None, steps: int
) -> list[tuple[str, str]]:
    """The main table: what a step costs (``flops``: ``step_flops``) and how well it uses the
    devices."""
    b2, b3 = config.batch.size_2d, config.batch.size_3d
    devices = jax.device_count()
    achieved = flops / timing.step_s / 1e12 if flops else None
    mfu = achieved / (peak * devices) if achieved and peak else None
    return [
        ("parameters", f"{timing.params / 1e6:.1f}M"),
        ("global batch (2D + 3D)", f"{b2} + {b3}"),
        ("trace + lower s", f"{timing.lower_s:.1f}"),
        ("compile s", f"{timing.compile_s:.1f}"),
        (f"step s (median of {steps})", f"{timing.step_s:.3f}"),
        ("samples/s 2D", f"{b2 / timing.step_s:.3g}"),
        ("samples/s 3D", f"{b3 / timing.step_s:.3g}"),
        ("GFLOP / step (XLA cost analysis)", _fmt(flops, 1e9, ".4g")),
        ("achieved TFLOP/s", _fmt(achieved, 1, ".3f")),
        ("MFU", _mfu_cell(mfu, peak)),
        ("peak memory / device GiB", _fmt(timing.memory, 2**30, ".2f")),
        ("host batch preparation s / step", f"{data[0]:.4f}"),
        ("host-to-device s / step", f"{data[1]:.4f}"),
    ]


def _mfu_cell(mfu: float | None, peak: float | None) -> str:
    if mfu is not None:
        return f"{100 * mfu:.1f}%"
    return "n/a (no FLOP count)" if peak else "n/a (no peak known)"


def _fmt(value: float | None, unit: float, spec: str) -> str:
    return "n/a" if value is None else format(value / unit, spec)


def checked_mesh_and_text(config) -> tuple[jax.sharding.Mesh, TextTower]:
    """The config's mesh over all devices and a from-scratch text tower, after the checks that
    need no data (model sizes, mesh, batch split)."""
    check_model(config)
    check_mesh(config, jax.device_count())
    mesh = sharding.mesh_from_config(config.mesh)
    check_batch_for_mesh(config, mesh.shape["data"] * mesh.shape["fsdp"])
    return mesh, text_tower(config)


def step_report(
    config, steps: int, peak: float | None = None, compare_unrolled: bool = False
) -> str:
    """The benchmark of ``config``: a line on what ran it, the main table and, with
    ``compare_unrolled``, scanned against unrolled layers. ``peak``: TFLOP/s of one device
    (default: ``peak_tflops`` of the device kind)."""
    mesh, text = checked_mesh_and_text(config)
    device = jax.devices()[0]
    peak = peak or peak_tflops(device.device_kind)
    dtype = compute_dtype(config.precision.compute_dtype)

    timing = time_step(config, mesh, text, steps)
    unrolled = None
    if compare_unrolled:
        unrolled = time_step(with_unrolled_layers(config), mesh, text, steps)
    flops = step_flops(config, text)
    data = data_seconds(config, mesh, text.config.vocab_size, steps)

    lines = [
        f"{jax.device_count()} x {device.device_kind} ({platform.processor() or platform.machine()}"
        f"), jax {jax.__version__}, preset {config.get('preset', '?')}, compute {dtype.name}, "
        f"attention {attention_implementation(config.model.attention, dtype)}, remat "
        f"{config.model.remat}, layers {'unrolled' if config.model.unroll_layers else 'scanned'}, "
        f"mesh {dict(mesh.shape)}, "
        f"peak {'n/a' if peak is None else f'{peak:g}'} TFLOP/s/device"
        f", host malloc huge pages {'on' if huge_pages_requested() else 'off'}",
        table(report_rows(config, timing, flops, data, peak, steps)),
    ]
    if unrolled is not None:
        lines.append("\n| layers | trace + lower s | compile s | step s |\n|---|---|---|---|")
        for name, t in (("scanned", timing), ("unrolled", unrolled)):
            lines.append(f"| {name} | {t.lower_s:.1f} | {t.compile_s:.1f} | {t.step_s:.3f} |")
    return "\n".join(lines)


def out_of_memory(error: Exception) -> bool:
    """Whether compiling or running a step failed for want of device memory."""
    return isinstance(error, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()
    )


def variant_rows(
    config,
    variants: Sequence[dict[str, Any]],
    batches: Sequence[tuple[int, int]],
    steps: int,
    peak: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Each variant (overrides of ``config.model``, e.g. ``{"attention": "xla"}``) timed at the
    first global batch (2D, 3D) of ``batches`` that fits on the devices, one row as each is done;
    a variant none fits in is a row without a time. FLOPs (``step_flops``, the same for every
    variant) are counted once per batch, so MFU compares variants of one batch by their step
    times alone."""
    mesh, text = checked_mesh_and_text(config)
    peak = peak or peak_tflops(jax.devices()[0].device_kind)
    dtype = compute_dtype(config.precision.compute_dtype)
    flops: dict[tuple[int, int], float | None] = {}
    for overrides in variants:
        variant = config.copy_and_resolve_references()
        variant.model.update(overrides)
        row: dict[str, Any] = {
            "variant": ", ".join(f"{k}={v}" for k, v in overrides.items()) or "config",
            "attention": attention_implementation(variant.model.attention, dtype),
            "remat": variant.model.remat,
            "layers": "unrolled" if variant.model.unroll_layers else "scanned",
            "batch": None,
            "did_not_fit": [],
        }
        for batch in batches:
            variant.batch.update(size_2d=batch[0], size_3d=batch[1])
            try:
                timing = time_step(variant, mesh, text, steps)
            except jax.errors.JaxRuntimeError as error:
                if not out_of_memory(error):
                    raise
                row["did_not_fit"].append(list(batch))
                continue
            if batch not in flops:
                flops[batch] = step_flops(variant, text)
            achieved = flops[batch] / timing.step_s / 1e12 if flops[batch] else None
            row.update(
                batch=list(batch),
                compile_s=timing.compile_s,
                step_s=timing.step_s,
                samples_per_s=sum(batch) / timing.step_s,
                tflops=achieved,
                mfu=achieved / (peak * jax.device_count()) if achieved and peak else None,
                program_gib=None
                if timing.program_memory is None
                else timing.program_memory / 2**30,
            )
            break
        yield row


def variant_table(rows: list[dict[str, Any]]) -> str:
    """``variant_rows`` as markdown, one line per variant."""
    lines = [
        "| variant | attention | remat | layers | batch | compile s | step s | samples/s "
        "| TFLOP/s | MFU | program GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['variant']} | {r['attention']} | {r['remat']} | {r['layers']} |"
        tried = ", ".join(f"{b2} + {b3}" for b2, b3 in r["did_not_fit"])
        if r["batch"] is None:
            lines.append(f"{head} none fits ({tried}) | | | | | | |")
            continue
        batch = f"{r['batch'][0]} + {r['batch'][1]}" + (f" ({tried} did not fit)" if tried else "")
        lines.append(
            f"{head} {batch} | {r['compile_s']:.1f} | "
            f"{r['step_s']:.3f} | {r['samples_per_s']:.4g} | {_fmt(r['tflops'], 1, '.1f')} | "
            f"{_fmt(r['mfu'], 0.01, '.1f')}{'' if r['mfu'] is None else '%'} | "
            f"{_fmt(r['program_gib'], 1, '.2f')} |"
        )
    return "\n".join(lines)
