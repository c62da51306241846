"""`python -m unimedi_jax.benchmark` (docs/launching.md's line, at the tiny preset) and the
huge-page restart every command makes (core/host_memory.py)."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest

from configs.pretrain import get_config
from tests.tiny_runs import subprocess_env
from unimedi_jax.core import host_memory
from unimedi_jax.diagnostics import step_benchmark

BENCHMARK = ["-m", "unimedi_jax.benchmark", "--config=configs/pretrain.py:tiny", "--steps", "1"]


def test_benchmark_readme_line_restarts_with_huge_pages(tmp_path):
    """docs/launching.md's line (tiny preset, one step): the command restarted itself with huge
    pages (its header says so; the rules of the restart are unit-tested below)."""
    env = subprocess_env()
    env = {k: v for k, v in env.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, *BENCHMARK, "--compare_unrolled"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "host malloc huge pages on" in out
    assert "| step s (median of 1) |" in out
    assert "| scanned |" in out and "| unrolled |" in out


def test_huge_pages_requested_reads_the_tunable():
    assert host_memory.huge_pages_requested({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not host_memory.huge_pages_requested({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    assert not host_memory.huge_pages_requested({})


@pytest.fixture
def exec_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(host_memory, "_kernel_offers_huge_pages", lambda: True)
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(host_memory.sys, "orig_argv", ["python", "-m", "unimedi_jax.main", "--x"])
    monkeypatch.delenv(host_memory.OPT_OUT, raising=False)
    return calls


def test_restart_keeps_the_arguments_and_other_tunables(exec_calls, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    host_memory.restart_with_huge_pages()
    [(executable, argv, env)] = exec_calls
    assert executable == sys.executable
    assert argv == ["python", "-m", "unimedi_jax.main", "--x"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert host_memory.huge_pages_requested(env)


@pytest.mark.parametrize(
    "setting",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice stands
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # already restarted
        {host_memory.OPT_OUT: "0"},
    ],
)
def test_no_restart_when_set_or_opted_out(exec_calls, monkeypatch, setting):
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    host_memory.restart_with_huge_pages()
    assert exec_calls == []


def test_no_restart_without_glibc_or_huge_pages(exec_calls, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    host_memory.restart_with_huge_pages()
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(host_memory, "_kernel_offers_huge_pages", lambda: False)
    host_memory.restart_with_huge_pages()
    assert exec_calls == []


def test_mfu_says_why_it_is_missing():
    config = get_config("tiny")
    timing = step_benchmark.StepTiming(10, 1.0, 1.0, 0.5, None)
    rows = dict(step_benchmark.report_rows(config, timing, None, (0.0, 0.0), 989.0, 1))
    assert rows["MFU"] == "n/a (no FLOP count)"
    rows = dict(step_benchmark.report_rows(config, timing, 2e12, (0, 0), None, 1))
    assert rows["MFU"] == "n/a (no peak known)"
    rows = dict(step_benchmark.report_rows(config, timing, 2e12, (0, 0), 8.0, 1))
    assert rows["MFU"] == "50.0%"  # 2 TFLOP in 0.5 s on a device of 8 TFLOP/s


def test_flops_are_the_maths_whatever_the_attention_kernel_layer_loop_and_remat(monkeypatch):
    """The FLOP count is the step with unrolled layers, XLA's attention and no remat whatever the
    config runs (cuDNN's kernel is a custom call that XLA counts nothing for; a scanned loop's
    body is counted once; recomputation is not the model's work), lowered for one CPU device
    (jax 0.11.2's GPU backend on an H200 counted nothing, docs/benchmarks.md "GPU check"), so MFU
    prints with cuDNN attention, and the benchmark with and without --compare_unrolled reports
    one count."""
    config = get_config("tiny")
    mesh, text = step_benchmark.checked_mesh_and_text(config)
    counted = []
    count = step_benchmark._lowered_step_flops

    def spy(config, mesh, text):
        model, devices = config.model, mesh.devices.flat
        counted.append(
            (model.attention, model.remat, model.unroll_layers, len(devices), devices[0].platform)
        )
        return count(config, mesh, text)

    monkeypatch.setattr(step_benchmark, "_lowered_step_flops", spy)
    flops = []
    for attention, remat in (("cudnn", "dots"), ("xla", "none")):
        config.model.update(attention=attention, remat=remat)
        flops.append(step_benchmark.step_flops(config, text))
    assert counted == [("xla", "none", True, 1, "cpu")] * 2
    assert flops[0] == flops[1] > 0
    # Scanned, a layer is counted once; under full remat, the forward twice.
    assert count(config, mesh, text) < flops[1]
    config.model.update(unroll_layers=True, remat="full")
    assert count(config, mesh, text) > flops[1]
    config.model.update(unroll_layers=False, remat="none")

    monkeypatch.setattr(step_benchmark, "step_flops", lambda *args: 3e9)
    monkeypatch.setattr(
        step_benchmark, "time_step", lambda *args: step_benchmark.StepTiming(1, 0, 0, 1.5, None)
    )
    for compare_unrolled in (False, True):
        report = step_benchmark.step_report(config, 1, compare_unrolled=compare_unrolled)
        assert "| GFLOP / step (XLA cost analysis) | 3 |" in report
        assert "| achieved TFLOP/s | 0.002 |" in report


def test_variants_fall_back_to_the_largest_batch_that_fits(monkeypatch):
    """``variant_rows``: each variant at the first batch whose step compiles and runs; a batch
    that runs out of device memory is named, any other error is raised; FLOPs counted once per
    batch. The times are faked (no compile): this is the bookkeeping, ``DRY_RUN=1
    launch/device_check.sh`` runs the real thing."""
    config = get_config("tiny")
    fits = {("xla", "none"): 4, ("cudnn", "none"): 2, ("cudnn", "dots"): 0}

    def time_step(variant, mesh, text, steps):
        key = (variant.model.attention, variant.model.remat)
        if variant.batch.size_2d > fits[key]:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")
        return step_benchmark.StepTiming(1, 0.1, 2.0, 0.5, None, 3 * 2**30)

    counted = []
    monkeypatch.setattr(step_benchmark, "time_step", time_step)
    monkeypatch.setattr(
        step_benchmark, "step_flops", lambda v, *a: counted.append(v.batch.size_2d) or 1e12
    )
    variants = [
        {"attention": "xla"},
        {"attention": "cudnn"},
        {"attention": "cudnn", "remat": "dots"},
    ]
    rows = list(step_benchmark.variant_rows(config, variants, [(4, 2), (2, 1)], 1, peak=4.0))
    assert [r["batch"] for r in rows] == [[4, 2], [2, 1], None]
    assert [r["did_not_fit"] for r in rows] == [[], [[4, 2]], [[4, 2], [2, 1]]]
    assert counted == [4, 2]
    assert rows[0]["samples_per_s"] == 12.0 and rows[0]["tflops"] == 2.0
    assert rows[0]["mfu"] == 0.5 and rows[0]["program_gib"] == 3.0
    table = step_benchmark.variant_table(rows).splitlines()
    assert table[2] == (
        "| attention=xla | xla | none | scanned | 4 + 2 | 2.0 | 0.500 | 12 | 2.0 | 50.0% | 3.00 |"
    )
    assert "| 2 + 1 (4 + 2 did not fit) |" in table[3]
    assert "| none fits (4 + 2, 2 + 1) |" in table[4]

    def broken(*args):
        raise jax.errors.JaxRuntimeError("INTERNAL: cuDNN failed")

    monkeypatch.setattr(step_benchmark, "time_step", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="cuDNN"):
        list(step_benchmark.variant_rows(config, variants[:1], [(4, 2)], 1))
