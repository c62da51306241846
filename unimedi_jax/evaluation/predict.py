"""Predict functions: what evaluation and inference compute from a UniMedI's params.

One implementation for a loaded run (``trained_model.py``, behind the public inference API, on a
one-device mesh) and for in-loop evaluation (on the training mesh). The params are used where
they lie: sharded over the mesh by FSDP / tensor parallelism during training, so no host or
device ever gathers the whole model. Inputs are cut into fixed-size batches (the last
zero-padded, so each input shape compiles once) split over the mesh's data axes; outputs come
back replicated and small ([N, width] features, [N, E] embeddings, [N, D] slice scores) as
numpy on every process. On a multi-process mesh every process must make the same calls with the
same inputs: the jitted functions are collective.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from unimedi_jax.core import sharding
from unimedi_jax.method import selection
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.models.vit import token_grid


def _select(model: UniMedI, params, volumes, k: int):
    """Eq. 1 of the volume alone -> Eq. 2 slice scores -> top-k slices (sorted)."""
    attention = model.apply({"params": params}, volumes, method=UniMedI.encode_vision).cls_attention
    grid = token_grid(volumes.shape[1:], model.vision.patch_3d)
    scores = selection.slice_scores(attention, grid, volumes.shape[1])
    return selection.top_k_slices(scores, k), scores


def _cls(model: UniMedI, params, x, slices):
    """Final-norm [CLS] of images, volumes or volumes with the given slices [B, k, H, W]."""
    return model.apply({"params": params}, x, slices, method=UniMedI.encode_vision).tokens[:, 0]


def _cls_features(model: UniMedI, params, x, k: int):
    """Final-norm [CLS] of images, volumes (k=0) or volumes with their k selected slices."""
    slices = None
    if k:
        indices, _ = _select(model, params, x, k)
        slices = selection.gather_slices(x, indices)
    return _cls(model, params, x, slices)


def _embed_vision(model: UniMedI, params, x, k: int):
    """Shared-space embeddings of images, or of volumes with their k selected slices."""
    features = _cls_features(model, params, x, k)
    return model.apply({"params": params}, features, method=UniMedI.project_vision)


def _embed_with_slices(model: UniMedI, params, volumes, indices):
    """Shared-space embeddings of volumes with the given slices ``indices`` [B, k]."""
    features = _cls(model, params, volumes, selection.gather_slices(volumes, indices))
    return model.apply({"params": params}, features, method=UniMedI.project_vision)


def _embed_text(model: UniMedI, params, ids, mask):
    return model.apply({"params": params}, ids, mask, method=UniMedI.embed_text)


class _Jitted(NamedTuple):
    select: Callable
    cls_features: Callable
    embed_vision: Callable
    embed_with_slices: Callable
    embed_text: Callable


@functools.cache
def _jitted(model: UniMedI, mesh: jax.sharding.Mesh) -> _Jitted:
    """The predict functions of one model on one mesh, compiled once per input shape (cached,
    so each in-loop evaluation reuses the compiles of the first)."""
    out = sharding.replicated(mesh)
    jit = lambda fn, static: jax.jit(
        functools.partial(fn, model), static_argnames=static, out_shardings=out
    )
    return _Jitted(
        jit(_select, "k"),
        jit(_cls_features, "k"),
        jit(_embed_vision, "k"),
        jit(_embed_with_slices, ()),
        jit(_embed_text, ()),
    )


class Predictor:
    """The predict functions of ``model`` on ``mesh`` with a fixed batch size (rounded up to a
    multiple of the mesh's batch shards)."""

    def __init__(self, model: UniMedI, mesh: jax.sharding.Mesh, batch_size: int = 16):
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.model = model
        self.mesh = mesh
        self.batch_size = -(-batch_size // shards) * shards
        self._fns = _jitted(model, mesh)

    def _batched(self, fn: Callable, *arrays: np.ndarray):
        """Applies ``fn`` to fixed-size row chunks (the last zero-padded), each split over the
        mesh's batch axes, and concatenates the replicated results on the host."""
        total = len(arrays[0])
        batch = sharding.batch_sharding(self.mesh)
        outputs = []
        for start in range(0, total, self.batch_size):
            chunks = [np.asarray(a[start : start + self.batch_size]) for a in arrays]
            n = len(chunks[0])
            padded = [
                np.pad(c, [(0, self.batch_size - n)] + [(0, 0)] * (c.ndim - 1)) for c in chunks
            ]
            placed = [
                jax.make_array_from_callback(p.shape, batch, lambda index, p=p: p[index])
                for p in padded
            ]
            outputs.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], fn(*placed)))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)

    def cls_features(self, params: dict, x: np.ndarray, k: int = 0) -> np.ndarray:
        """Final-norm [CLS] features [N, width] of X-rays [N, H, W] or volumes [N, D, H, W]
        (with their ``k`` attentively selected slices when k > 0): linear-probe inputs."""
        return self._batched(lambda b: self._fns.cls_features(params, b, k=k), x)

    def embed_vision(self, params: dict, x: np.ndarray, k: int = 0) -> np.ndarray:
        """L2-normalised shared-space embeddings [N, E] of X-rays, or of volumes with their
        ``k`` selected slices in the joint pass."""
        return self._batched(lambda b: self._fns.embed_vision(params, b, k=k), x)

    def embed_volumes_with_slices(
        self, params: dict, volumes: np.ndarray, indices: np.ndarray
    ) -> np.ndarray:
        """Embeddings [N, E] of volumes in the joint pass with the slices ``indices`` [N, k]
        chosen by the caller (another selector than Eq. 2's)."""
        indices = np.asarray(indices, np.int32)
        return self._batched(
            lambda v, i: self._fns.embed_with_slices(params, v, i), volumes, indices
        )

    def slice_indices_and_scores(
        self, params: dict, volumes: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(indices [N, k] sorted, per-slice scores [N, D]) of Eq. 2's attentive selection: what
        ``UniMedIInference.select_slices`` returns (the step's selection also gathers pixels)."""
        return self._batched(lambda b: self._fns.select(params, b, k=k), volumes)

    def embed_text(self, params: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """L2-normalised shared-space embeddings [N, E] of tokenised reports [N, L]."""
        return self._batched(lambda i, m: self._fns.embed_text(params, i, m), ids, mask)
