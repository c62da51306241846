"""Where a train step's time goes: a ``jax.profiler`` trace of the compiled step, summed per op
kind and per part of the step (the tables of docs/benchmarks.md, "Where the step's time goes").

The library of ``python -m unimedi_jax.profile_step``. The step is the one
``step_benchmark.compile_step`` builds (the real trainer, random batches of the config's shapes).
Each trace event that names an HLO instruction (``args.hlo_op``) is one executed op (on a CPU a
thunk, on a GPU a kernel); a ``while``/``conditional``/``call`` event only encloses the ops of
its body, which have events of their own, so it is not counted. Events are joined by name with
``compiled.as_text()``: the instruction's ``op_name`` metadata says which part of the step made
it. ``transpose(jvp(`` is the backward pass of the student's loss, ``jvp(`` without ``transpose``
its forward pass, neither the teacher and the no-grad update; the scope (``encode_vision``,
``embed_text``, ``dino``) says which tower or head. Only these categories are used, never fusion
names, so the attribution survives changes to what XLA fuses.

Op time is summed over every thread (and device): where ops overlap, it exceeds the wall time.
XLA's cost analysis of a compiled program is one total, not one per fusion (jax 0.10), so the
top-op table gives time and the result shape, not FLOPs.
"""

from __future__ import annotations

import functools
import gzip
import json
import platform
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import jax

from unimedi_jax.diagnostics.step_benchmark import checked_mesh_and_text, compile_step, timed

# The parts of a step, in the order the tables list them.
VISION_FORWARD = "vision forward (student)"
VISION_BACKWARD = "vision backward (student)"
TEACHER_VISION = "teacher vision (slice selection, targets, masks)"
TEXT_FORWARD = "text tower forward"
TEXT_BACKWARD = "text tower backward"
DINO_TEACHER = "DINO head, teacher"
DINO_FORWARD = "DINO head, student forward"
DINO_BACKWARD = "DINO head, student backward"
LOSSES = "projections and losses (forward + backward)"
SELECTION = "slice gather, top-k, token masks"
UPDATE = "AdamW, EMA, centres, other no-grad ops"
UNATTRIBUTED = "not attributed (no op_name metadata, none inherited)"
PARTS = (
    VISION_FORWARD,
    VISION_BACKWARD,
    TEACHER_VISION,
    TEXT_FORWARD,
    TEXT_BACKWARD,
    DINO_TEACHER,
    DINO_FORWARD,
    DINO_BACKWARD,
    LOSSES,
    SELECTION,
    UPDATE,
    UNATTRIBUTED,
)

# Ops whose events enclose the events of the computations they run.
CONTAINER_OPCODES = frozenset({"while", "conditional", "call"})
# No-grad primitives of slice selection (Eq. 2) and token masking outside the encoder's scope.
_SELECTION_PRIMITIVES = re.compile(r"/(top_k|sort|argsort|gather|scatter|scatter-add)\b")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")
_REFERENCE = re.compile(r"%([\w.\-]+)")


class HloOp(NamedTuple):
    """One instruction of the compiled module: what the trace's events are joined with."""

    opcode: str
    shape: str
    op_name: str  # "" where XLA made the instruction without metadata
    computation: str  # the computation that holds it
    operands: tuple[str, ...]  # instructions it reads (and computations it calls)


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
    """Instruction name -> ``HloOp`` of every computation of the module's text."""
    ops, computation = {}, ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header[1]
            continue
        match = _INSTRUCTION.match(line)
        if match:
            op_name = _OP_NAME.search(line)
            body = line[match.end() :].split(" metadata=")[0]
            ops[match[1]] = HloOp(
                match[3],
                match[2],
                op_name[1] if op_name else "",
                computation,
                tuple(_REFERENCE.findall(body)),
            )
    return ops


def attribute(ops: dict[str, HloOp]) -> dict[str, str]:
    """Instruction name -> part of the step. An instruction without ``op_name`` metadata (XLA's
    own copies, zero fills, layout changes) takes the part of the loop or branch that runs it,
    else that of the first instruction reading its result that has one; ``UNATTRIBUTED`` if none.
    """
    callers: dict[str, str] = {}  # computation -> the instruction that runs it
    users: dict[str, list[str]] = defaultdict(list)
    for name, op in ops.items():
        for ref in op.operands:
            if ref in ops:
                users[ref].append(name)
            else:
                callers.setdefault(ref, name)

    @functools.cache
    def own(name: str) -> str:
        part = part_of(ops[name].op_name)
        caller = callers.get(ops[name].computation)
        return own(caller) if part == UNATTRIBUTED and caller else part

    @functools.cache
    def inherited(name: str) -> str:
        part = own(name)
        for user in users.get(name, ()):  # data flow within a computation: no cycles
            if part != UNATTRIBUTED:
                break
            part = inherited(user)
        return part

    return {name: inherited(name) for name in ops}


def module_name(hlo_text: str) -> str:
    """The ``HloModule`` name, which the trace's events carry as ``hlo_module``."""
    match = re.search(r"^HloModule ([^\s,]+)", hlo_text, re.M)
    return match[1] if match else ""


def op_kind(name: str) -> str:
    """An instruction's kind: its name without the numeric suffix (``ynn_fusion.12`` ->
    ``ynn_fusion``, ``copy.3`` -> ``copy``); XLA names a fusion after what it fuses."""
    return re.sub(r"\.\d+$", "", name)


def part_of(op_name: str) -> str:
    """The part of the step an instruction with this ``op_name`` metadata belongs to."""
    if not op_name:
        return UNATTRIBUTED
    backward = "transpose(jvp(" in op_name
    forward = not backward and "jvp(" in op_name
    if "encode_vision" in op_name:
        return VISION_BACKWARD if backward else VISION_FORWARD if forward else TEACHER_VISION
    if "embed_text" in op_name or "encode_text" in op_name:
        # The text tower runs only under the gradient; a no-grad pass would be a loss term's.
        return TEXT_BACKWARD if backward else TEXT_FORWARD if forward else LOSSES
    if "dino" in op_name:
        return DINO_BACKWARD if backward else DINO_FORWARD if forward else DINO_TEACHER
    if backward or forward:
        return LOSSES
    if _SELECTION_PRIMITIVES.search(op_name):
        return SELECTION
    return UPDATE


def trace_events(trace_dir: Path) -> list[dict]:
    """The events of the newest ``*.trace.json.gz`` that ``jax.profiler.trace`` wrote."""
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        return json.load(f)["traceEvents"]


def op_times(events: list[dict], module: str, ops: dict[str, HloOp]) -> dict[str, list[float]]:
    """Instruction name -> [executions, summed microseconds] of the module's op events. On a
    device's own timeline (a GPU's) only those events count, not the host's launches of them."""
    process = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    mine = [
        e
        for e in events
        if e.get("ph") == "X"
        and e.get("args", {}).get("hlo_op")
        and e["args"].get("hlo_module", module) == module
    ]
    on_device = [e for e in mine if process.get(e["pid"], "").startswith("/device:")]
    times: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in on_device or mine:
        name = e["args"]["hlo_op"]
        if name in ops and ops[name].opcode in CONTAINER_OPCODES:
            continue
        times[name][0] += 1
        times[name][1] += float(e.get("dur", 0.0))
    return dict(times)


def summarise(
    times: dict[str, list[float]], ops: dict[str, HloOp], steps: int, top: int = 15
) -> dict[str, Any]:
    """Per op kind, per part of the step and the ``top`` ops by time: seconds per step and
    share of the summed op time (shares are fractions; each table's sum to 1)."""
    total = sum(us for _, us in times.values())
    if total <= 0:
        raise ValueError("the trace holds no timed op of the step's module")
    part = attribute(ops)
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    per_part = dict.fromkeys(PARTS, 0.0)
    for name, (calls, us) in times.items():
        per_kind[op_kind(name)][0] += calls
        per_kind[op_kind(name)][1] += us
        per_part[part.get(name, UNATTRIBUTED)] += us

    def row(us: float) -> dict[str, float]:
        return {"s_per_step": us / steps / 1e6, "share": us / total}

    kinds = sorted(per_kind.items(), key=lambda kv: -kv[1][1])
    biggest = sorted(times.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "steps": steps,
        "op_s_per_step": total / steps / 1e6,
        "op_kinds": [
            {"kind": k, "calls_per_step": calls / steps, **row(us)} for k, (calls, us) in kinds
        ],
        "parts": [{"part": p, **row(us)} for p, us in per_part.items()],
        "top_ops": [
            {
                "op": name,
                "part": part.get(name, UNATTRIBUTED),
                "shape": ops[name].shape if name in ops else "?",
                "calls_per_step": calls / steps,
                **row(us),
            }
            for name, (calls, us) in biggest
        ],
    }


def tables(summary: dict[str, Any], kinds: int = 15) -> str:
    """The summary as markdown: op kinds (the ``kinds`` biggest, then the rest in one row), parts
    of the step, the biggest ops."""

    def ms(r: dict) -> str:
        return f"{1e3 * r['s_per_step']:.2f}"

    def pct(share: float) -> str:
        return f"{100 * share:.1f}%"

    head, rest = summary["op_kinds"][:kinds], summary["op_kinds"][kinds:]
    lines = ["| op kind | ops / step | ms / step | share |", "|---|---|---|---|"]
    lines += [
        f"| `{r['kind']}` | {r['calls_per_step']:.0f} | {ms(r)} | {pct(r['share'])} |" for r in head
    ]
    if rest:
        share = sum(r["share"] for r in rest)
        rest_ms = 1e3 * sum(r["s_per_step"] for r in rest)
        lines.append(f"| {len(rest)} other kinds | | {rest_ms:.2f} | {pct(share)} |")
    lines += ["", "| part of the step | ms / step | share |", "|---|---|---|"]
    lines += [f"| {r['part']} | {ms(r)} | {pct(r['share'])} |" for r in summary["parts"]]
    lines += [
        "",
        "| op (time only: no per-fusion FLOPs from XLA) | part | result shape | runs / step "
        "| ms / step | share |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| `{r['op']}` | {r['part']} | `{r['shape']}` | {r['calls_per_step']:g} | {ms(r)} "
        f"| {pct(r['share'])} |"
        for r in summary["top_ops"]
    ]
    return "\n".join(lines)


def profile_step(config, steps: int, out: Path | None = None, top: int = 15) -> tuple[str, dict]:
    """Compiles the step of ``config``, runs one warm-up and ``steps`` traced steps and returns
    (markdown, summary). With ``out``, writes ``profile.md``, ``profile.json``, the compiled
    module's text (``step.hlo.txt``, what the events were joined with) and keeps the trace in
    ``out/trace``."""
    mesh, text = checked_mesh_and_text(config)
    step = compile_step(config, mesh, text)
    state, _ = jax.block_until_ready(step.compiled(step.trainer.state, step.batch))
    hlo = step.compiled.as_text()
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = Path(out) / "trace" if out else Path(scratch)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(steps):
                (state, _), seconds = timed(lambda s=state: step.compiled(s, step.batch))
        events = trace_events(trace_dir)
    ops = hlo_ops(hlo)
    summary = summarise(op_times(events, module_name(hlo), ops), ops, steps, top)
    device = jax.devices()[0]
    summary.update(
        device=f"{jax.device_count()} x {device.device_kind}",
        host=platform.processor() or platform.machine(),
        jax=jax.__version__,
        preset=config.get("preset", "?"),
        last_step_wall_s=seconds,
    )
    text_out = "\n".join(
        [
            f"{summary['device']} ({summary['host']}), jax {summary['jax']}, preset "
            f"{summary['preset']}, {steps} traced steps: op time {summary['op_s_per_step']:.3f} s"
            f" / step (summed over threads), last step {seconds:.3f} s wall (traced)",
            "",
            tables(summary, top),
        ]
    )
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "profile.md").write_text(text_out + "\n")
        (Path(out) / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")
        (Path(out) / "step.hlo.txt").write_text(hlo)
    return text_out, summary
