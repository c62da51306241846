"""Reading a local Hugging Face BERT directory (config.json and weights) into the text tower.

File I/O kept out of ``models/text.py``, whose modules never touch a file: safetensors, Flax
msgpack or torch (weights only) files, from a BertModel or a pre-training wrapper.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization, traverse_util
from safetensors import SafetensorError, safe_open

from unimedi_jax.models.text import BertConfig, BertEncoder, Dtype, TextModelError

WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")

# Our module name -> (Hugging Face module path, kind). Kinds decide the leaf names in the file.
EMBEDDING_SOURCES = {
    "word": ("embeddings.word_embeddings", "embed"),
    "position": ("embeddings.position_embeddings", "embed"),
    "token_type": ("embeddings.token_type_embeddings", "embed"),
    "norm": ("embeddings.LayerNorm", "norm"),
}
LAYER_SOURCES = {
    "query": ("attention.self.query", "linear"),
    "key": ("attention.self.key", "linear"),
    "value": ("attention.self.value", "linear"),
    "attention_output": ("attention.output.dense", "linear"),
    "attention_norm": ("attention.output.LayerNorm", "norm"),
    "intermediate": ("intermediate.dense", "linear"),
    "output": ("output.dense", "linear"),
    "output_norm": ("output.LayerNorm", "norm"),
}
# (kind, our leaf) -> (leaf name in a torch/safetensors file, leaf name in a Flax file).
FILE_LEAVES = {
    ("embed", "embedding"): ("weight", "embedding"),
    ("norm", "scale"): ("weight", "scale"),
    ("norm", "bias"): ("bias", "bias"),
    ("linear", "kernel"): ("weight", "kernel"),
    ("linear", "bias"): ("bias", "bias"),
}


def read_bert_config(directory: Path) -> BertConfig:
    """The BertConfig of a local Hugging Face directory (its config.json), checked for BERT."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise TextModelError(
            f"no config.json in {directory}: a Hugging Face BERT directory needs config.json "
            f"next to one of {', '.join(WEIGHT_FILES)}"
        )
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise TextModelError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise TextModelError(
            f"{config_file} holds a JSON {type(raw).__name__.replace('dict', 'object')}, not an "
            "object; a Hugging Face config.json is one object of fields (hidden_size, ...)"
        )
    # Old conversions (BioClinicalBERT among them) have no model_type; those are BERT.
    model_type = raw.get("model_type", "bert")
    if model_type != "bert":
        raise TextModelError(
            f"{config_file}: model_type is {model_type!r}, but only 'bert' checkpoints can be "
            "loaded into the text tower"
        )
    try:
        return BertConfig.from_hf_dict(raw)
    except (TextModelError, TypeError) as e:
        raise TextModelError(f"{config_file}: {e}") from e


def _read_torch(weights_file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise TextModelError(
            f"{weights_file} needs torch to read; install torch or convert the checkpoint to "
            "model.safetensors"
        ) from e
    try:
        state = torch.load(weights_file, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # Not chained: torch's message suggests loading unsafely, which we never do.
        raise TextModelError(
            f"{weights_file} cannot be read as a plain tensor checkpoint ({type(e).__name__}: "
            "torch.load with weights_only=True refused it or it is damaged); convert it to "
            "model.safetensors (saved from a trusted copy) and put that file in its place"
        ) from None
    if not isinstance(state, Mapping):
        raise TextModelError(f"{weights_file} does not hold a state dict of tensors")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        # Checkpoints converted from TensorFlow by early pytorch-pretrained-bert name the
        # LayerNorm parameters gamma/beta.
        for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
            if key.endswith(old):
                key = key[: -len(old)] + new
        tensors[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
    return tensors


def _read_weights(directory: Path) -> tuple[Path, dict[str, np.ndarray], bool]:
    """Returns (file, flat tensors keyed by dotted names, whether the file uses Flax layout)."""
    found = [directory / name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not found:
        raise TextModelError(
            f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}"
        )
    weights_file = found[0]
    if weights_file.name == "model.safetensors":
        # The flax reader handles bfloat16, which numpy cannot; keep the arrays on the host.
        try:
            with (
                jax.default_device(jax.devices("cpu")[0]),
                safe_open(weights_file, framework="flax") as f,
            ):
                tensors = {key: np.asarray(f.get_tensor(key)) for key in f.keys()}  # noqa: SIM118
        except SafetensorError as e:
            raise TextModelError(
                f"{weights_file} is truncated or damaged ({e}); copy or download it again"
            ) from e
        return weights_file, tensors, False
    if weights_file.name == "flax_model.msgpack":
        tree = serialization.msgpack_restore(weights_file.read_bytes())
        return weights_file, traverse_util.flatten_dict(tree, sep="."), True
    return weights_file, _read_torch(weights_file), False


def _key_prefix(tensors: Mapping[str, np.ndarray], suffix: str, weights_file: Path) -> str:
    """The wrapper prefix ('' for BertModel, 'bert.' for BertForPreTraining/MaskedLM)."""
    prefixes = sorted({key[: -len(suffix)] for key in tensors if key.endswith(suffix)})
    if len(prefixes) > 1:
        raise TextModelError(
            f"{weights_file} holds several BERT encoders (prefixes {prefixes}); save the one "
            "you want as a BertModel"
        )
    return prefixes[0] if prefixes else ""


def _params_from_tensors(
    config: BertConfig, tensors: Mapping[str, np.ndarray], flax_layout: bool, weights_file: Path
) -> dict[str, Any]:
    """Builds exactly the tree of ``nn.unbox(BertEncoder(config).init(...)['params'])``."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), dummy, dummy)
    target = traverse_util.flatten_dict(nn.unbox(shapes["params"]))
    word_leaf = FILE_LEAVES[("embed", "embedding")][flax_layout]
    prefix = _key_prefix(tensors, f"embeddings.word_embeddings.{word_leaf}", weights_file)

    def fetch(key: str, shape: tuple[int, ...], leaf: str, out_size: int) -> np.ndarray:
        size = int(np.prod(shape))
        if leaf == "kernel":  # torch Linear stores [out, in], Flax Dense [in, out]
            rows_cols = (size // out_size, out_size)
            expected = rows_cols if flax_layout else rows_cols[::-1]
        else:
            expected = shape if leaf == "embedding" else (size,)
        if key not in tensors:
            raise TextModelError(
                f"{weights_file}: tensor {key!r} (shape {expected}) is missing; the checkpoint "
                "does not match a BERT encoder"
            )
        value = np.asarray(tensors[key], dtype=np.float32)
        if value.shape != expected:
            raise TextModelError(
                f"{weights_file}: tensor {key!r} has shape {value.shape} but config.json implies "
                f"{expected}; the config and the weights do not belong together"
            )
        if leaf == "kernel" and not flax_layout:
            value = value.T
        return value.reshape(shape)

    params = {}
    for path, spec in target.items():
        group, module, leaf = path
        if group == "embeddings":
            hf_module, kind = EMBEDDING_SOURCES[module]
            key = f"{prefix}{hf_module}.{FILE_LEAVES[(kind, leaf)][flax_layout]}"
            params[path] = fetch(key, spec.shape, leaf, out_size=0)
            continue
        hf_module, kind = LAYER_SOURCES[module]
        file_leaf = FILE_LEAVES[(kind, leaf)][flax_layout]
        out_size = int(np.prod(target[(group, module, "bias")].shape[1:]))
        params[path] = np.stack(
            [
                fetch(
                    f"{prefix}encoder.layer.{i}.{hf_module}.{file_leaf}",
                    spec.shape[1:],
                    leaf,
                    out_size,
                )
                for i in range(config.num_hidden_layers)
            ]
        )
    return traverse_util.unflatten_dict(params)


def load_hf_bert(
    path: str | Path, *, dtype: Dtype = jnp.float32, remat: str = "none"
) -> tuple[BertEncoder, dict[str, Any]]:
    """Reads a local Hugging Face BERT directory into (module, float32 numpy param tree).

    Accepts config.json with model.safetensors, flax_model.msgpack or pytorch_model.bin (in that
    order of preference), saved from BertModel or from a pre-training/MLM wrapper ('bert.'
    prefix; heads such as 'cls.*' and the pooler are ignored).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise TextModelError(
            f"text model directory {directory} does not exist; point the text checkpoint config "
            "at a local Hugging Face BERT directory"
        )
    config = read_bert_config(directory)
    weights_file, tensors, flax_layout = _read_weights(directory)
    params = _params_from_tensors(config, tensors, flax_layout, weights_file)
    return BertEncoder(config, dtype=dtype, remat=remat), params
