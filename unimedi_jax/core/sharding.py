"""Device mesh, logical-axis rules and sharded state/batch construction.

Parameters name their axes logically ('embed', 'mlp', 'heads', 'kv', 'vocab', 'layers') through
``nn.with_logical_partitioning``; the rules here map those names to the mesh axes
('data', 'fsdp', 'tensor'). Because a mesh axis of size 1 shards nothing, one set of rules serves
pure data parallelism, FSDP and FSDP + tensor parallelism: only the mesh shape changes, and
``config.mesh.preset`` (:data:`MESH_PRESETS`) names the usual shapes. Under FSDP every parameter is
split over 'fsdp', also one whose logical names the rules leave unsplit there (a bias, the DINO
head): it gets 'fsdp' on its largest dimension that divides (never the scanned 'layers' axis).

Optimizer state: ``optax`` builds its state with ``tree_map`` over the params, so calling
``tx.init`` on the *boxed* params (inside the function given to :func:`create_sharded`) keeps the
``LogicallyPartitioned`` boxes on mu/nu, and they get exactly the params' shardings. Leaves without
a box (step counters, scalars) are replicated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
SCAN_AXIS = "layers"  # the stacked-layers dimension of scanned parameters: never split

# (data, fsdp, tensor) of each mesh.preset; -1 fills the devices left over. A mesh.data /
# mesh.fsdp / mesh.tensor field other than 0 replaces the preset's size for that axis.
MESH_PRESETS = {
    "dp": (-1, 1, 1),  # pure data parallelism: every device holds all parameters
    "fsdp": (1, -1, 1),  # parameters, gradients and optimizer state split over all devices
    "fsdp_tp": (1, -1, 2),  # FSDP, and attention heads / MLP units split over pairs of devices
}

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

log = logging.getLogger(__name__)


def fill_mesh_sizes(data: int, fsdp: int, tensor: int, count: int) -> tuple[int, int, int]:
    """The axis sizes of a mesh over ``count`` devices; one size may be -1 (fill the rest).

    Raises ``ValueError`` naming the mesh fields when the sizes cannot cover the devices: callers
    outside a config pass sizes too (``make_mesh``); config/checks.py turns it into a ConfigError.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    given = ", ".join(f"mesh.{name}={size}" for name, size in sizes.items())
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1 or any(size != -1 and size < 1 for size in sizes.values()):
        raise ValueError(
            f"{given}: each must be a positive integer, and at most one may be -1 "
            f"(fill the rest of the {count} devices)"
        )
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill and count % known == 0:
        sizes[fill[0]] = count // known
    if math.prod(sizes.values()) != count:
        raise ValueError(
            f"{given}: the mesh needs data * fsdp * tensor == the device count ({count}); "
            f"change them so the product is {count}, or set one of them to -1"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices; one size may be -1 (fill the rest).

    Uses ``jax.make_mesh`` so the device order follows the hardware topology (and keeps each
    process's devices together on multi-host CPU/GPU). Axes are ``Auto``: shardings propagate
    GSPMD-style from the in/out shardings of ``jax.jit``, as the logical-partitioning flow expects.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        fill_mesh_sizes(data, fsdp, tensor, len(devices)),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def preset_mesh_sizes(preset: str, data: int, fsdp: int, tensor: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of a mesh config: the preset's sizes, each non-zero field replacing one.

    The one place config fields become axis sizes, so the run, the benchmark and the config
    checks agree. The result may hold -1 (fill the devices left over: :func:`fill_mesh_sizes`).
    ``preset`` is a key of MESH_PRESETS (config/checks.py checks a config's).
    """
    given = (data, fsdp, tensor)
    return tuple(size or default for size, default in zip(given, MESH_PRESETS[preset], strict=True))


def mesh_from_config(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh a config's ``mesh`` section (preset and sizes) asks for over ``devices``."""
    m = mesh_config
    return make_mesh(*preset_mesh_sizes(m.preset, m.data, m.fsdp, m.tensor), devices=devices)


def logical_axis_rules(fsdp: bool = True, tensor: bool = True) -> Rules:
    """The default logical -> mesh mapping; ``fsdp``/``tensor`` False keep those dims replicated.

    The batch always splits over ('data', 'fsdp'): FSDP is data parallelism whose parameters are
    also split, so both axes see different examples.
    """
    return (
        ("batch", BATCH_AXES),
        ("embed", "fsdp" if fsdp else None),
        ("mlp", "tensor" if tensor else None),
        ("heads", "tensor" if tensor else None),
        ("vocab", "tensor" if tensor else None),
        ("kv", None),
        ("layers", None),
    )


def _checked_rules(rules: Sequence[Sequence[Any]], mesh: Mesh) -> Rules:
    """Rules as tuples (config overrides may arrive as lists), naming only axes of ``mesh``."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"a sharding rule must be (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
        named = axes if isinstance(axes, tuple) else (axes,)
        unknown = [a for a in named if a is not None and a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"sharding rule {rule!r} names mesh axes {unknown}; "
                f"the mesh axes are {tuple(mesh.axis_names)}"
            )
        out.append((name, axes))
    return tuple(out)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _axes_size(mesh: Mesh, axes: MeshAxes) -> int:
    return math.prod(mesh.shape[a] for a in _as_tuple(axes))


def _shards_params_over_fsdp(rules: Rules, mesh: Mesh) -> bool:
    """Whether the rules split some parameter axis over an 'fsdp' mesh axis of size > 1."""
    if mesh.shape.get(FSDP_AXIS, 1) == 1:
        return False
    return any(FSDP_AXIS in _as_tuple(axes) for name, axes in rules if name != "batch")


def _add_fsdp(names: Sequence[str | None], shape: Sequence[int], dims: list, mesh: Mesh) -> None:
    """Puts 'fsdp' on the largest per-device dimension it divides, if no dimension has it yet.

    A parameter left whole on every FSDP device would cost its full size there, as would its
    gradient and both Adam moments; the all-gather of a small one before use is cheap.
    """
    if any(FSDP_AXIS in _as_tuple(axes) for axes in dims):
        return
    fsdp = mesh.shape[FSDP_AXIS]
    candidates = [
        (size // _axes_size(mesh, axes), i)
        for i, (name, size, axes) in enumerate(zip(names, shape, dims, strict=True))
        if name != SCAN_AXIS and size % (_axes_size(mesh, axes) * fsdp) == 0
    ]
    if candidates:
        _, i = max(candidates, key=lambda c: (c[0], -c[1]))  # largest; the first of equals
        dims[i] = FSDP_AXIS if dims[i] is None else (*_as_tuple(dims[i]), FSDP_AXIS)


def _param_spec(
    path: str, names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> P:
    """PartitionSpec of one parameter; an indivisible dimension is replicated (with a warning).

    Under FSDP (the rules split parameters over 'fsdp') one dimension always carries 'fsdp'
    where any dimension divides (:func:`_add_fsdp`).
    """
    if len(names) != len(shape):
        raise ValueError(f"parameter {path}: axis names {tuple(names)} do not match shape {shape}")
    try:
        spec = nn.logical_to_mesh_axes(names, rules)
    except ValueError as e:
        raise ValueError(f"parameter {path} (axis names {tuple(names)}): {e}") from e
    dims = []
    for size, axes in zip(shape, spec, strict=True):
        split = _axes_size(mesh, axes)
        if size % split:
            log.warning(
                "parameter %s: dimension of size %d does not divide over mesh axes %s "
                "(%d devices); replicating it",
                path,
                size,
                axes,
                split,
            )
            axes = None
        dims.append(axes)
    if _shards_params_over_fsdp(rules, mesh):
        _add_fsdp(names, shape, dims, mesh)
    return P(*dims)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def param_shardings(abstract_variables: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Any:
    """NamedShardings for a (possibly abstract) tree holding ``LogicallyPartitioned`` boxes.

    Works for any state tree: boxed leaves (params and optax moments made from boxed params) map
    through ``rules``; other leaves (counters, scalars, unboxed arrays) are replicated. The result
    has the structure of the *unboxed* tree, ready for ``jax.jit`` in/out shardings.
    """
    rules = _checked_rules(rules, mesh)

    def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        if _is_box(leaf):
            shape = tuple(leaf.value.shape)
            return NamedSharding(
                mesh, _param_spec(jax.tree_util.keystr(path), leaf.names, shape, mesh, rules)
            )
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_variables, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (scalars, metrics, step counters)."""
    return NamedSharding(mesh, P())


def _unbox(tree: Any) -> Any:
    """Strips the boxes without the sharding constraint ``LogicallyPartitioned.unbox`` may add."""
    return jax.tree_util.tree_map(
        lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box
    )


def create_sharded(
    init_fn: Callable[..., Any], *args: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]
) -> tuple[Any, Any]:
    """Runs ``init_fn(*args)`` under ``jax.jit`` with ``out_shardings``: (unboxed state, shardings).

    Each device computes only its shards, so the full state never sits on one device. ``init_fn``
    returns a tree with ``LogicallyPartitioned`` leaves; build the optimizer state inside it with
    ``tx.init(boxed_params)`` so mu/nu inherit the params' shardings.
    """
    shardings = param_shardings(jax.eval_shape(init_fn, *args), mesh, rules)
    state = jax.jit(lambda *a: _unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return state, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _batch_shards(mesh: Mesh) -> tuple[list[int], int]:
    """(sorted batch-shard indices this process holds, total number of batch shards)."""
    total = _axes_size(mesh, BATCH_AXES)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((total,))
    return sorted({index[0].start or 0 for index in index_map.values()}), total


def process_batch_slice(mesh: Mesh, global_size: int) -> slice:
    """Rows of a global batch of ``global_size`` that this process loads and passes to
    :func:`global_batch` (the whole range on one process).

    Loaders use it so the global batch is the same whatever the process count. Its ValueError
    serves callers with sizes of their own (fine-tuning, benchmarks); config/checks.py checks
    ``batch.size_2d``/``size_3d`` at start.
    """
    local, total = _batch_shards(mesh)
    if global_size % total:
        raise ValueError(
            f"a global batch of {global_size} does not divide over the data * fsdp = {total} "
            "batch shards of the mesh; make the batch size a multiple of it"
        )
    if local != list(range(local[0], local[0] + len(local))):
        raise ValueError(f"this process holds non-contiguous batch shards {local} of {total}")
    rows = global_size // total
    return slice(local[0] * rows, (local[-1] + 1) * rows)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays (leading axis sharded over ('data', 'fsdp')) from this process's rows.

    Each process passes its :func:`process_batch_slice` of every array; the global leading size
    is the local one times the number of processes sharing the batch.
    """
    sharding = batch_sharding(mesh)
    local, total = _batch_shards(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % len(local):
            rows = value.shape[0] if value.ndim else "no"
            raise ValueError(
                f"batch[{key!r}] has {rows} rows on this process, which do not split over the "
                f"{len(local)} of {total} data * fsdp batch shards (mesh {dict(mesh.shape)}) it "
                f"holds; the global batch size must be a multiple of {total}"
            )
        global_shape = (value.shape[0] * total // len(local), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
