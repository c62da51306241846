"""python -m unimedi_jax.profile_step: docs/launching.md's line at the tiny preset, and the
attribution of ops to parts of the step on a hand-built program whose forward / backward /
no-grad ops are known."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from tests.tiny_runs import subprocess_env
from unimedi_jax.diagnostics import step_profile as sp

ROOT = Path(__file__).resolve().parents[1]


def _readme_args() -> list[str]:
    """The profile_step line of docs/launching.md, as arguments after ``python -m MODULE``."""
    (line,) = re.findall(
        r"`python -m unimedi_jax\.profile_step ([^`]*)`",
        (ROOT / "docs" / "launching.md").read_text(),
    )
    return line.split()


def test_readme_line_at_tiny_size(tmp_path):
    """The README's line, narrowed to the tiny preset and one traced step: every part of the step
    the tiny preset has shows up with time, and the shares of each table sum to one."""
    args = [a.replace(":demo", ":tiny") for a in _readme_args()]
    args = [a for a in args if not a.startswith("--out")] + [f"--out={tmp_path / 'p'}"]
    args[args.index("--steps") + 1] = "1"
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "unimedi_jax.profile_step", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| part of the step |" in proc.stdout and "| op kind |" in proc.stdout
    summary = json.loads((tmp_path / "p" / "profile.json").read_text())
    parts = {r["part"]: r["share"] for r in summary["parts"]}
    assert set(parts) == set(sp.PARTS)
    assert sum(parts.values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(r["share"] for r in summary["op_kinds"]) == pytest.approx(1.0, abs=1e-9)
    for part in (
        sp.VISION_FORWARD,
        sp.VISION_BACKWARD,
        sp.TEACHER_VISION,
        sp.TEXT_FORWARD,
        sp.TEXT_BACKWARD,
        sp.DINO_TEACHER,
        sp.DINO_FORWARD,
        sp.DINO_BACKWARD,
        sp.LOSSES,
        sp.UPDATE,
    ):
        assert parts[part] > 0, part
    # The trace and the module text it was joined with stay for a second look.
    assert list((tmp_path / "p" / "trace").rglob("*.trace.json.gz"))
    ops = sp.hlo_ops((tmp_path / "p" / "step.hlo.txt").read_text())
    assert all(r["op"] in ops for r in summary["top_ops"])


def _hand_built_step(w, teacher, x):
    """A teacher pass without gradient, a student loss under value_and_grad, an SGD update: the
    step's structure in a few ops, scoped as the model's methods are."""
    with jax.named_scope("UniMedI.encode_vision"):
        target = jax.lax.stop_gradient(jnp.tanh(x @ teacher))

    def loss(w):
        with jax.named_scope("UniMedI.encode_vision"):
            y = jnp.tanh(x @ w)
        return jnp.sum((y - target) ** 2 * jnp.arange(y.shape[1]))

    value, grad = jax.value_and_grad(loss)(w)
    return w - 0.1 * grad, value


def test_ops_of_a_hand_built_step_are_attributed_to_their_part():
    """Every encoder op of the compiled program (teacher, student forward, backward) lands in
    its part, and a synthetic trace of known durations sums to the right share per part; a
    ``while`` event, which only encloses its body's ops, is not counted."""
    w, x = jnp.ones((16, 8)), jnp.ones((4, 16))
    compiled = jax.jit(_hand_built_step).lower(w, 0.5 * w, x).compile()
    hlo = compiled.as_text()
    ops = sp.hlo_ops(hlo)
    parts = sp.attribute(ops)
    encoder = {name: op for name, op in ops.items() if "encode_vision" in op.op_name}
    by_part = {}
    for name, op in encoder.items():
        # Independent reference: the op_name itself, read as jax writes it.
        if "transpose(jvp(" in op.op_name:
            expected = sp.VISION_BACKWARD
        elif "jvp(" in op.op_name:
            expected = sp.VISION_FORWARD
        else:
            expected = sp.TEACHER_VISION
        assert parts[name] == expected, (name, op.op_name)
        by_part.setdefault(expected, []).append(name)
    assert set(by_part) == {sp.VISION_FORWARD, sp.VISION_BACKWARD, sp.TEACHER_VISION}

    module = sp.module_name(hlo)
    durations = {sp.VISION_FORWARD: 30.0, sp.VISION_BACKWARD: 50.0, sp.TEACHER_VISION: 20.0}
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}}]
    for part, names in by_part.items():
        for name in names:
            args = {"hlo_op": name, "hlo_module": module}
            events.append({"ph": "X", "pid": 1, "dur": durations[part] / len(names), "args": args})
    enclosing = {"hlo_op": "while.1", "hlo_module": module}
    events.append({"ph": "X", "pid": 1, "dur": 1000.0, "args": enclosing})
    events.append({"ph": "X", "pid": 1, "dur": 7.0, "args": {"hlo_op": "x", "hlo_module": "other"}})
    ops["while.1"] = sp.HloOp("while", "()", "jit(f)/while", "main", ())
    summary = sp.summarise(sp.op_times(events, module, ops), ops, steps=2)
    shares = {r["part"]: r["share"] for r in summary["parts"] if r["share"]}
    assert shares == pytest.approx({p: d / 100.0 for p, d in durations.items()})
    assert summary["op_s_per_step"] == pytest.approx(100e-6 / 2)


def test_part_of_reads_the_transform_and_the_scope():
    """A hand-written op_name for every part (as jax names the step's ops)."""
    j = "jit(<unnamed function>)"
    cases = {
        f"{j}/transpose(jvp(UniMedI.encode_vision))/vision/encoder/while/body/dot": (
            sp.VISION_BACKWARD
        ),
        f"{j}/jvp(UniMedI.encode_vision)/vision/encoder/while/body/dot": sp.VISION_FORWARD,
        f"{j}/UniMedI.encode_vision/vision/vision.embed/conv": sp.TEACHER_VISION,
        f"{j}/jvp(UniMedI.embed_text)/UniMedI.encode_text/text/layers/dot": sp.TEXT_FORWARD,
        f"{j}/transpose(jvp(UniMedI.embed_text))/text_proj/Dense_0/dot": sp.TEXT_BACKWARD,
        f"{j}/UniMedI.dino/dino_head/mlp_0/dot_general": sp.DINO_TEACHER,
        f"{j}/jvp(UniMedI.dino)/dino_head/erfc": sp.DINO_FORWARD,
        f"{j}/transpose(jvp(UniMedI.dino))/dino_head/mul": sp.DINO_BACKWARD,
        f"{j}/transpose(jvp(jit(log_softmax)))/reduce_sum": sp.LOSSES,
        f"{j}/jvp(UniMedI.project_vision)/image_proj/Dense_0/dot": sp.LOSSES,
        f"{j}/top_k": sp.SELECTION,
        f"{j}/vmap()/gather": sp.SELECTION,
        f"{j}/sqrt": sp.UPDATE,
        "": sp.UNATTRIBUTED,
    }
    assert {k: sp.part_of(k) for k in cases} == cases


def test_ops_without_metadata_inherit_their_loop_or_their_reader():
    """A copy inside a loop body takes the loop's part; a zero fill in the entry computation
    takes the part of the first op reading it; an op nothing attributed reads stays unattributed."""
    hlo = """HloModule m, entry_computation_layout={()->f32[]}

%body (p: (f32[2])) -> (f32[2]) {
  %p = (f32[2]{0}) parameter(0)
  %copy.1 = f32[2]{0} copy(%p)
  ROOT %tuple.1 = (f32[2]{0}) tuple(%copy.1)
}

ENTRY %main () -> f32[] {
  %wrapped_broadcast.1 = f32[2]{0} fusion(), kind=kLoop, calls=%fill
  %tuple.2 = (f32[2]{0}) tuple(%wrapped_broadcast.1)
  %while.1 = (f32[2]{0}) while(%tuple.2), condition=%cond, body=%body, metadata={op_name="BWD"}
  %copy.2 = f32[2]{0} copy(%wrapped_broadcast.1)
  ROOT %constant.1 = f32[] constant(0)
}
"""
    backward = "jit(f)/transpose(jvp(UniMedI.encode_vision))/while"
    parts = sp.attribute(sp.hlo_ops(hlo.replace("BWD", backward)))
    assert parts["copy.1"] == sp.VISION_BACKWARD
    assert parts["wrapped_broadcast.1"] == sp.VISION_BACKWARD
    assert parts["copy.2"] == sp.UNATTRIBUTED
