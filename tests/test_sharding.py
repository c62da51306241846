"""Mesh construction, logical-axis shardings, sharded init/apply and global batches.

Multi-device checks (the ``check_*`` functions) run in a fresh interpreter with 8 fake CPU
devices: ``XLA_FLAGS`` must be set before jax starts, and the rest of the suite keeps seeing the
one real CPU device.
"""

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from tests.fake_devices import fake_device_flags
from tests.tiny_models import TINY_VIT
from unimedi_jax.core import sharding
from unimedi_jax.models.vit import VisionTransformer

HERE = Path(__file__).resolve().parent
FAKE_DEVICES = 8


def check_process(call: str, devices: int = FAKE_DEVICES) -> subprocess.Popen:
    """Starts ``t.<call>`` (t = this module) in an interpreter that sees ``devices`` CPU devices."""
    env = {
        **os.environ,
        # Fast, unoptimised CPU codegen: the models are tiny and compile time dominates.
        "XLA_FLAGS": f"{fake_device_flags(devices)} --xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    return subprocess.Popen(
        [sys.executable, "-c", f"import {Path(__file__).stem} as t; t.{call}"],
        env=env,
        cwd=HERE.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def assert_succeeds(*procs: subprocess.Popen) -> None:
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output


def on_fake_devices(check) -> None:
    """Runs ``check()`` from this module in a subprocess that sees 8 CPU devices."""
    assert_succeeds(check_process(f"{check.__name__}()"))


def tiny_state(rng: jax.Array, images: jax.Array) -> dict:
    """Boxed params and the adamw state built from them (so mu/nu keep the boxes)."""
    params = VisionTransformer(**TINY_VIT).init(rng, images)["params"]
    tx = optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    return {"params": params, "opt_state": tx.init(params)}


def box_leaf(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


# --- single device -----------------------------------------------------------------------------


def test_make_mesh_error_names_config_fields():
    one = jax.devices()[:1]
    with pytest.raises(ValueError, match=r"mesh.data=2, mesh.fsdp=1, mesh.tensor=1.*\(1\)"):
        sharding.make_mesh(2, 1, 1, devices=one)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.make_mesh(-1, -1, 1, devices=one)
    with pytest.raises(ValueError, match=r"mesh\.tensor=0"):
        sharding.make_mesh(1, 1, 0, devices=one)
    assert dict(sharding.make_mesh(-1, 1, 1, devices=one).shape) == {
        "data": 1,
        "fsdp": 1,
        "tensor": 1,
    }


def test_logical_axis_rules_default_and_switches():
    rules = dict(sharding.logical_axis_rules())
    assert rules == {
        "batch": ("data", "fsdp"),
        "embed": "fsdp",
        "mlp": "tensor",
        "heads": "tensor",
        "vocab": "tensor",
        "kv": None,
        "layers": None,
    }
    off = dict(sharding.logical_axis_rules(fsdp=False, tensor=False))
    assert off["batch"] == ("data", "fsdp")
    assert {k: v for k, v in off.items() if k != "batch"} == dict.fromkeys(off.keys() - {"batch"})


def test_rules_from_config_and_clear_errors():
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 6), jnp.float32), ("embed", "mlp"))
    # Config overrides arrive as lists; they mean the same as tuples.
    as_lists = [["embed", ["fsdp", "tensor"]], ["mlp", None]]
    assert sharding.param_shardings({"w": box}, mesh, as_lists)["w"].spec == P(
        ("fsdp", "tensor"), None
    )
    with pytest.raises(ValueError, match=r"mesh axes \['model'\]"):
        sharding.param_shardings({"w": box}, mesh, [("embed", "model")])
    twice = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 4), jnp.float32), ("mlp", "mlp"))
    with pytest.raises(ValueError, match=r"parameter \['head'\]\['w'\]"):
        sharding.param_shardings({"head": {"w": twice}}, mesh, sharding.logical_axis_rules())


# --- 8 fake devices ----------------------------------------------------------------------------


def check_make_mesh() -> None:
    assert jax.device_count() == FAKE_DEVICES
    for sizes, want in [((8, 1, 1), (8, 1, 1)), ((2, 2, 2), (2, 2, 2)), ((-1, 2, 1), (4, 2, 1))]:
        mesh = sharding.make_mesh(*sizes)
        assert mesh.axis_names == ("data", "fsdp", "tensor")
        assert tuple(mesh.shape.values()) == want
        assert sorted(d.id for d in mesh.devices.flat) == list(range(FAKE_DEVICES))
    for bad in [(3, 2, 1), (-1, 3, 1)]:
        fields = f"mesh.data={bad[0]}, mesh.fsdp={bad[1]}, mesh.tensor={bad[2]}"
        with pytest.raises(ValueError, match=rf"{re.escape(fields)}.*device count \(8\)"):
            sharding.make_mesh(*bad)


def test_make_mesh_on_8_devices():
    on_fake_devices(check_make_mesh)


def check_sharded_state_and_step() -> None:
    mesh = sharding.make_mesh(2, 2, 2)
    images = np.random.default_rng(0).normal(size=(8, 32, 32)).astype(np.float32)
    state, shardings = sharding.create_sharded(
        tiny_state, jax.random.key(0), images[:2], mesh=mesh, rules=sharding.logical_axis_rules()
    )
    params = state["params"]
    assert not any(box_leaf(x) for x in jax.tree.leaves(state, is_leaf=box_leaf))
    fc1 = params["encoder"]["blocks"]["fc1"]["kernel"]  # [layers, embed, mlp] = [2, 32, 64]
    assert fc1.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in fc1.addressable_shards} == {(2, 16, 32)}
    assert len(fc1.sharding.device_set) == FAKE_DEVICES
    expected = {
        ("encoder", "blocks", "query", "kernel"): P(None, "fsdp", "tensor", None),
        ("encoder", "blocks", "out", "kernel"): P(None, "tensor", None, "fsdp"),
        ("encoder", "blocks", "fc2", "kernel"): P(None, "tensor", "fsdp"),
        # No logical axis maps to 'fsdp': it joins 'tensor' on the largest dimension.
        ("encoder", "blocks", "fc1", "bias"): P(None, ("tensor", "fsdp")),
        ("encoder", "norm", "scale"): P("fsdp"),
        ("embed_2d", "proj", "kernel"): P(None, None, None, "fsdp"),
        ("cls_token",): P("fsdp"),
    }
    for path, spec in expected.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
    # The arrays carry exactly the shardings returned for jit in/out shardings.
    assert jax.tree.map(lambda x: x.sharding, state) == shardings
    adam = state["opt_state"][0]
    for moments in (adam.mu, adam.nu):
        assert jax.tree.map(lambda x: x.sharding, moments) == shardings["params"]
    assert adam.count.sharding == sharding.replicated(mesh)
    # Sharded init draws the same numbers as a plain single-device init.
    device = jax.devices()[0]
    reference = jax.jit(lambda k: nn.unbox(tiny_state(k, images[:2])))(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, reference, state)

    # A sharded forward + backward pass gives the numbers of the one-device one.
    model = VisionTransformer(**TINY_VIT)

    def loss(p, x):
        out = model.apply({"params": p}, x)
        return jnp.mean(out.tokens**2) + jnp.mean(out.cls_attention[:, :3])

    grad_fn = jax.value_and_grad(loss)
    batch = sharding.global_batch({"images": images}, mesh)["images"]
    sharded = jax.jit(
        grad_fn,
        in_shardings=(shardings["params"], sharding.batch_sharding(mesh)),
        out_shardings=(None, shardings["params"]),
    )(params, batch)
    single = jax.jit(grad_fn)(reference["params"], jax.device_put(images, device))
    assert sharded[1]["encoder"]["blocks"]["fc1"]["kernel"].sharding.spec == P(
        None, "fsdp", "tensor"
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), sharded, single
    )


def test_sharded_state_optimizer_and_step_on_8_devices():
    on_fake_devices(check_sharded_state_and_step)


def check_global_batch() -> None:
    mesh = sharding.make_mesh(2, 2, 2)
    local = {
        "images": np.arange(8 * 3 * 5, dtype=np.float32).reshape(8, 3, 5),
        "ids": np.arange(8, dtype=np.int32),
    }
    batch = sharding.global_batch(local, mesh)
    for key, value in local.items():
        np.testing.assert_array_equal(np.asarray(batch[key]), value)
        assert batch[key].sharding == sharding.batch_sharding(mesh)
        # 4 batch shards (data x fsdp), each replicated over the 2 tensor devices.
        assert {s.data.shape[0] for s in batch[key].addressable_shards} == {2}
        assert len(batch[key].addressable_shards) == FAKE_DEVICES
    assert sharding.process_batch_slice(mesh, 8) == slice(0, 8)
    with pytest.raises(ValueError, match=r"batch\['volumes'\] has 6 rows.*multiple of 4"):
        sharding.global_batch({"volumes": np.zeros((6, 2))}, mesh)
    with pytest.raises(ValueError, match=r"global batch of 6 .* data \* fsdp = 4"):
        sharding.process_batch_slice(mesh, 6)


def test_global_batch_on_8_devices():
    on_fake_devices(check_global_batch)


def check_indivisible_dimension_is_replicated() -> None:
    mesh = sharding.make_mesh(1, 2, 4)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(sharding.__name__).addHandler(handler)
    tree = {
        "odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 8), jnp.float32), ("embed", "mlp")),
        "even": nn.LogicallyPartitioned(
            jax.ShapeDtypeStruct((4, 6), jnp.float32), ("embed", "mlp")
        ),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    specs = jax.tree.map(
        lambda s: s.spec, sharding.param_shardings(tree, mesh, sharding.logical_axis_rules())
    )
    # 'odd' cannot split its 'embed' dimension over 'fsdp', so FSDP splits its other one.
    assert specs == {"odd": P(None, ("tensor", "fsdp")), "even": P("fsdp", None), "step": P()}
    messages = sorted(r.getMessage() for r in records)  # leaves come in key order
    assert len(messages) == 2, messages
    assert "['even']" in messages[0] and "size 6" in messages[0], messages
    assert "['odd']" in messages[1] and "size 3" in messages[1], messages


def test_indivisible_dimension_is_replicated_on_8_devices():
    on_fake_devices(check_indivisible_dimension_is_replicated)


def check_two_process_batch(process_id: int, port: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    weights = np.arange(8, dtype=np.float32)
    for sizes, rows in [((2, 2, 1), 4), ((1, 2, 2), 4), ((1, 1, 4), 8)]:
        mesh = sharding.make_mesh(*sizes)
        local = sharding.process_batch_slice(mesh, 8)
        assert local.stop - local.start == rows, (sizes, local)
        batch = sharding.global_batch({"x": full[local]}, mesh)["x"]
        assert batch.shape == full.shape
        for shard in batch.addressable_shards:
            np.testing.assert_array_equal(shard.data, full[shard.index])
        # An order-sensitive reduction over the whole global batch, gathered to every process.
        weighted = jax.jit(lambda x: weights @ x, out_shardings=sharding.replicated(mesh))(batch)
        np.testing.assert_allclose(np.asarray(weighted), weights @ full)


def test_global_batch_two_processes():
    """2 processes x 2 devices: each loads its rows, the global array is the same batch."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    assert_succeeds(
        *(check_process(f"check_two_process_batch({i}, {port})", devices=2) for i in range(2))
    )
