"""Inference API: load a trained checkpoint; embed images, volumes and texts; select slices.

    model = inference.load("runs/demo")               # a workdir or one of its checkpoint dirs
    image_emb = model.embed_images(xrays)             # [N, H, W] float in [0, 1] -> [N, E]
    volume_emb = model.embed_volumes(cts)             # [N, D, H, W] -> [N, E], with slice selection
    text_emb = model.embed_texts(["No pleural effusion.", ...])
    indices, scores = model.select_slices(cts, k=4)

Inputs are what the pipeline's eval transforms produce. Work is batched internally with a fixed
batch size (the last batch padded), so each input shape compiles once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimedi_jax import selection
from unimedi_jax.checkpoint import Checkpointer
from unimedi_jax.models.unimedi import UniMedI, build_unimedi
from unimedi_jax.precision import compute_dtype
from unimedi_jax.text_setup import load_text_tower


def resolve_run(path: str | Path) -> tuple[Path, int | None]:
    """(workdir, step) from a workdir (latest checkpoint) or a ``checkpoints/<step>`` dir."""
    path = Path(path)
    if (path / "config.json").exists():
        return path, None
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(
        f"{path} is neither a run workdir (with config.json) nor a checkpoint directory "
        "(<workdir>/checkpoints/<step>)"
    )


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    """The resolved config a run saved at its start."""
    return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))


class UniMedIInference:
    """A trained UniMedI's params with jitted, batched embedding functions."""

    def __init__(
        self, config, model: UniMedI, params: dict, teacher: dict, tokenizer, batch_size: int = 16
    ):
        self.config = config
        self.model = model
        self.student = params
        self.teacher = {**params, **teacher}  # teacher vision + DINO head, student projections
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._patch_3d = tuple(config.model.patch_3d)

    def _params(self, use_teacher: bool) -> dict:
        return self.teacher if use_teacher else self.student

    def _batched(self, fn: Callable, arrays: np.ndarray) -> np.ndarray:
        """Applies ``fn`` to fixed-size chunks (the last padded), concatenating the outputs."""
        arrays = np.asarray(arrays, np.float32)
        outputs = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)
            padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            n = len(chunk)
            outputs.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], fn(padded)))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def _select(self, params, volumes, k):
        attention = self.model.apply(
            {"params": params}, volumes, method=UniMedI.encode_vision
        ).cls_attention
        grid = tuple(s // p for s, p in zip(volumes.shape[1:], self._patch_3d, strict=True))
        scores = selection.slice_scores(attention, grid, volumes.shape[1])
        indices = selection.top_k_slices(scores, k)
        return indices, scores

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def _cls(self, params, x, with_slices: bool):
        slices = None
        if with_slices:
            indices, _ = self._select(params, x, self.config.selection.k)
            slices = selection.gather_slices(x, indices)
        return self.model.apply({"params": params}, x, slices, method=UniMedI.encode_vision).tokens[
            :, 0
        ]

    @functools.partial(jax.jit, static_argnums=0)
    def _project_image(self, params, features):
        return self.model.apply({"params": params}, features, method=UniMedI.embed_image)

    def image_features(self, images: np.ndarray, use_teacher: bool = True) -> np.ndarray:
        """Final-norm [CLS] features [N, width] of X-rays [N, H, W]: linear-probe inputs."""
        params = self._params(use_teacher)
        return self._batched(lambda x: self._cls(params, x, False), images)

    def volume_features(
        self, volumes: np.ndarray, with_slices: bool = False, use_teacher: bool = True
    ) -> np.ndarray:
        """[CLS] features of volumes alone (what the PyTorch export reproduces) or with slices."""
        params = self._params(use_teacher)
        return self._batched(lambda x: self._cls(params, x, with_slices), volumes)

    def embed_images(self, images: np.ndarray, use_teacher: bool = True) -> np.ndarray:
        """L2-normalised shared-space embeddings [N, E] of X-rays."""
        params = self._params(use_teacher)
        return np.asarray(self._project_image(params, self.image_features(images, use_teacher)))

    def embed_volumes(self, volumes: np.ndarray, use_teacher: bool = True) -> np.ndarray:
        """Embeddings of volumes with attentive slice selection and the joint pass, as trained."""
        params = self._params(use_teacher)
        features = self.volume_features(volumes, with_slices=True, use_teacher=use_teacher)
        return np.asarray(self._project_image(params, features))

    def select_slices(
        self, volumes: np.ndarray, k: int | None = None, use_teacher: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(indices [N, k] sorted, per-slice scores [N, D]) of Eq. 2's attentive selection."""
        params = self._params(use_teacher)
        k = k or self.config.selection.k
        return self._batched(lambda x: self._select(params, x, k), volumes)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised shared-space embeddings [N, E] of report texts."""
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.config.text.max_length,
            return_tensors="np",
        )
        ids = encoded["input_ids"].astype(np.int32)
        mask = encoded["attention_mask"].astype(np.int32)
        out = [
            np.asarray(self._embed_text(self.student, ids[i : i + 64], mask[i : i + 64]))
            for i in range(0, len(ids), 64)
        ]
        return np.concatenate(out)

    @functools.partial(jax.jit, static_argnums=0)
    def _embed_text(self, params, ids, mask):
        return self.model.apply({"params": params}, ids, mask, method=UniMedI.embed_text)


def load(path: str | Path, batch_size: int = 16) -> UniMedIInference:
    """Loads the latest (or the given) checkpoint of a run for inference on the local device."""
    workdir, step = resolve_run(path)
    config = load_config(workdir)
    text = load_text_tower(config, workdir)
    model = build_unimedi(config, text.config, compute_dtype(config.precision.compute_dtype))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    step = step if step is not None else checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    state = checkpointer.restore_raw(step)
    checkpointer.close()
    params = jax.tree.map(jnp.asarray, state["params"])
    teacher = jax.tree.map(jnp.asarray, state["teacher"])
    return UniMedIInference(config, model, params, teacher, text.tokenizer, batch_size)
