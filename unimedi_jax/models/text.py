"""BERT text tower in flax.linen, numerically equal to transformers' ``BertModel``.

The paper's text encoder is BioClinicalBERT, so the module follows BERT exactly (post-LN, learned
absolute positions, token types) and ``load_hf_bert`` reads a local Hugging Face directory into
its parameter tree. Layers run under ``nn.scan`` so compile time stays flat in depth, and every
parameter carries logical axis names for ``sharding.py``. The loaders and tokenizer helpers at
the bottom do file I/O; the modules above them never do.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization, traverse_util
from safetensors import SafetensorError, safe_open

from unimedi_jax.core.errors import UserError
from unimedi_jax.models.layers import ones_init, scanned, zeros_init

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

Dtype = jnp.dtype | type

WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class TextModelError(UserError, ValueError):
    """A text-tower problem a person can fix (bad path, config or checkpoint)."""


_POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters; field names and defaults (bert-base) follow Hugging Face."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self):
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TextModelError(f"{name}={value!r} must be positive (a whole number)")
        if self.hidden_size % self.num_attention_heads:
            raise TextModelError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise TextModelError(
                f"hidden_act {self.hidden_act!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        """Reads the fields this module uses from a Hugging Face config.json dict."""
        position_type = d.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise TextModelError(
                f"position_embedding_type {position_type!r} is not supported; only 'absolute'"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json fields of an equivalent Hugging Face BertModel (for export)."""
        return {"model_type": "bert", **dataclasses.asdict(self)}

    @classmethod
    def from_scratch(
        cls,
        vocab_size: int,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 128,
    ) -> BertConfig:
        """A small randomly initialised BERT for the demo preset and tests (MLP 4x width)."""
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_position_embeddings,
        )


def _normal(names: tuple[str | None, ...]):
    """BERT's N(0, 0.02) init carrying logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), names)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    """Two-pass float32 LayerNorm, as torch computes it, whatever the compute dtype."""
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=ones_init(("embed",)),
        bias_init=zeros_init(("embed",)),
        name=name,
    )


class _BertLayer(nn.Module):
    """One post-LN transformer layer; (hidden, key_mask) -> (hidden, None) for nn.scan."""

    config: BertConfig
    dtype: Dtype
    deterministic: bool

    @nn.compact
    def __call__(self, hidden: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def qkv(name: str) -> jax.Array:
            return nn.DenseGeneral(
                (heads, head_dim),
                dtype=self.dtype,
                kernel_init=_normal(("embed", "heads", "kv")),
                bias_init=zeros_init(("heads", "kv")),
                name=name,
            )(hidden)

        q, k, v = qkv("query"), qkv("key"), qkv("value")
        attention_dropout = not self.deterministic and cfg.attention_probs_dropout_prob > 0
        if attention_dropout:
            # jax.nn.dot_product_attention has no dropout on the probabilities, so this
            # (training-only) path spells attention out; softmax stays in float32.
            logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
            logits = jnp.where(key_mask, logits / np.sqrt(head_dim), jnp.finfo(jnp.float32).min)
            probs = nn.Dropout(cfg.attention_probs_dropout_prob)(
                jax.nn.softmax(logits, axis=-1), deterministic=False
            )
            context = jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)
        else:
            context = jax.nn.dot_product_attention(q, k, v, mask=key_mask)
        attended = nn.DenseGeneral(
            cfg.hidden_size,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=_normal(("heads", "kv", "embed")),
            bias_init=zeros_init(("embed",)),
            name="attention_output",
        )(context)
        attended = nn.Dropout(cfg.hidden_dropout_prob)(attended, deterministic=self.deterministic)
        hidden = _layer_norm(cfg, "attention_norm")(hidden + attended)

        mlp = nn.Dense(
            cfg.intermediate_size,
            dtype=self.dtype,
            kernel_init=_normal(("embed", "mlp")),
            bias_init=zeros_init(("mlp",)),
            name="intermediate",
        )(hidden)
        mlp = nn.Dense(
            cfg.hidden_size,
            dtype=self.dtype,
            kernel_init=_normal(("mlp", "embed")),
            bias_init=zeros_init(("embed",)),
            name="output",
        )(_ACTIVATIONS[cfg.hidden_act](mlp))
        mlp = nn.Dropout(cfg.hidden_dropout_prob)(mlp, deterministic=self.deterministic)
        return _layer_norm(cfg, "output_norm")(hidden + mlp), None


class _BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout (float32)."""

    config: BertConfig
    deterministic: bool

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config

        def table(rows: int, names: tuple[str | None, str], name: str) -> nn.Embed:
            return nn.Embed(rows, cfg.hidden_size, embedding_init=_normal(names), name=name)

        positions = jnp.arange(input_ids.shape[1])[None, :]
        summed = (
            table(cfg.vocab_size, ("vocab", "embed"), "word")(input_ids)
            + table(cfg.max_position_embeddings, (None, "embed"), "position")(positions)
            + table(cfg.type_vocab_size, (None, "embed"), "token_type")(token_type_ids)
        )
        summed = _layer_norm(cfg, "norm")(summed)
        return nn.Dropout(cfg.hidden_dropout_prob)(summed, deterministic=self.deterministic)


class BertEncoder(nn.Module):
    """BERT without pooler: token ids -> last hidden states, float32, [B, L, hidden].

    Matmuls run in ``dtype``; parameters, LayerNorm and softmax stay float32 and so does the
    residual stream (post-LN makes it a LayerNorm output).
    ``remat`` is one of layers.REMAT_POLICIES; ``unroll_layers`` see layers.scanned.
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    unroll_layers: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """input_ids, attention_mask ({0, 1}) and token_type_ids are int [B, L]."""
        cfg = self.config
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise TextModelError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}; tokenize with a smaller max_length"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        hidden = _BertEmbeddings(cfg, deterministic, name="embeddings")(input_ids, token_type_ids)

        layers = scanned(_BertLayer, cfg.num_hidden_layers, self.remat, self.unroll_layers)(
            cfg, self.dtype, deterministic, name="layers"
        )
        key_mask = attention_mask.astype(bool)[:, None, None, :]  # [B, heads, queries, keys]
        hidden, _ = layers(hidden, key_mask)
        return hidden


# --------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints (file I/O lives here, outside the modules).

# Our module name -> (Hugging Face module path, kind). Kinds decide the leaf names in the file.
_EMBEDDING_SOURCES = {
    "word": ("embeddings.word_embeddings", "embed"),
    "position": ("embeddings.position_embeddings", "embed"),
    "token_type": ("embeddings.token_type_embeddings", "embed"),
    "norm": ("embeddings.LayerNorm", "norm"),
}
_LAYER_SOURCES = {
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
_FILE_LEAVES = {
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
    word_leaf = _FILE_LEAVES[("embed", "embedding")][flax_layout]
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
            hf_module, kind = _EMBEDDING_SOURCES[module]
            key = f"{prefix}{hf_module}.{_FILE_LEAVES[(kind, leaf)][flax_layout]}"
            params[path] = fetch(key, spec.shape, leaf, out_size=0)
            continue
        hf_module, kind = _LAYER_SOURCES[module]
        file_leaf = _FILE_LEAVES[(kind, leaf)][flax_layout]
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


# --------------------------------------------------------------------------------------------
# Tokenizers.

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_tokenizer(path: str | Path) -> BertTokenizerFast:
    """transformers' fast BERT tokenizer from a local directory (tokenizer.json or vocab.txt)."""
    # transformers and tokenizers are imported here, not at the top, so that importing the
    # model (as the train step does on every host) does not pay for them.
    from transformers import BertTokenizerFast

    directory = Path(path)
    if not directory.is_dir():
        raise TextModelError(f"tokenizer directory {directory} does not exist")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise TextModelError(
            f"no tokenizer in {directory}: expected tokenizer.json or vocab.txt (a Hugging Face "
            "BERT directory, or one written by train_wordpiece_tokenizer)"
        )
    return BertTokenizerFast.from_pretrained(directory, local_files_only=True)


def train_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int, directory: str | Path
) -> BertTokenizerFast:
    """Builds a lower-cased WordPiece vocabulary from report texts for the from-scratch demo.

    The same texts and ``vocab_size`` give the same files, byte for byte, in any process on any
    machine, so two runs of one config train the same model. Writes vocab.txt, tokenizer.json and
    tokenizer_config.json into ``directory`` and returns ``load_tokenizer(directory)``. Ids: the
    special tokens 0-4 ([PAD] = 0), the characters and the word-continuing ones (``##x``), each
    sorted, then the merged sub-words in the order they were learned. The vocabulary may come out
    smaller than ``vocab_size`` on a small corpus: size the model with ``len(tokenizer)``.
    """
    # Words are split exactly as the tokenizer written below will split them.
    backend = _bert_tokenizer(SPECIAL_TOKENS).backend_tokenizer
    word_counts: Counter[str] = Counter()
    for text in texts:
        words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
        word_counts.update(word for word, _ in words)
    tokens = _wordpiece_vocabulary(word_counts, vocab_size)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _bert_tokenizer(tokens).save_pretrained(directory)
    (directory / "vocab.txt").write_text("".join(f"{token}\n" for token in tokens))
    return load_tokenizer(directory)


def _bert_tokenizer(tokens: Iterable[str]) -> BertTokenizerFast:
    """transformers' lower-casing BERT tokenizer over ``tokens`` (id = position)."""
    from transformers import BertTokenizerFast

    vocab = {token: index for index, token in enumerate(tokens)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)


def _wordpiece_vocabulary(word_counts: Mapping[str, int], vocab_size: int) -> list[str]:
    """Special tokens, characters, word-continuing characters (``##x``), then sub-words merged
    from the most frequent adjacent pair until ``vocab_size`` tokens (tokenizers' WordPieceTrainer).

    That trainer breaks ties between equally frequent pairs in hash-map order, which differs from
    process to process; here the pair whose (left, right) strings sort first wins, so the result
    depends on the counts alone, not on the order they come in.
    """
    words = [[word[0], *(f"##{char}" for char in word[1:])] for word in word_counts]
    counts = list(word_counts.values())
    tokens = [*SPECIAL_TOKENS]
    tokens += sorted({char for word in word_counts for char in word})
    tokens += sorted({piece for word in words for piece in word[1:]})
    known = set(tokens)

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}  # the words a pair occurs in (or once did)
    for index, (word, count) in enumerate(zip(words, counts, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += count
            where.setdefault(pair, set()).add(index)
    # A min-heap on (-count, pair): the most frequent pair first, then the smallest strings.
    # Entries go stale as counts change; a popped one whose count moved is pushed back anew.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while heap and len(tokens) < vocab_size:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -negative_count:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        left, right = pair
        merged = left + right.removeprefix("##")
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        grown = set()
        for index in where.pop(pair):
            new_word = _merge_pair(words[index], pair, merged)
            change = Counter(pairwise(new_word))
            change.subtract(pairwise(words[index]))
            for changed, times in change.items():
                pair_counts[changed] += times * counts[index]
                if times > 0:
                    where.setdefault(changed, set()).add(index)
                    grown.add(changed)
            words[index] = new_word
        for changed in grown:
            heapq.heappush(heap, (-pair_counts[changed], changed))
    return tokens


def _merge_pair(word: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    """``word`` with each occurrence of ``pair``, left to right, replaced by ``merged``."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
