"""BERT text tower in flax.linen, numerically equal to transformers' ``BertModel``.

The paper's text encoder is BioClinicalBERT, so the module follows BERT exactly (post-LN, learned
absolute positions, token types) and ``text_tower.hugging_face.load_hf_bert`` reads a local
Hugging Face directory into its parameter tree. Layers run under ``nn.scan`` so compile time
stays flat in depth, and every parameter carries logical axis names for ``sharding.py``. No file
I/O here: the loaders and the tokenizer live in ``unimedi_jax/text_tower/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unimedi_jax.core.errors import UserError
from unimedi_jax.models.layers import dot_product_attention, ones_init, scanned, zeros_init

Dtype = jnp.dtype | type

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
    attention: str = "auto"

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
            context = dot_product_attention(q, k, v, self.attention, mask=key_mask)
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
    ``remat`` is one of layers.REMAT_POLICIES; ``unroll_layers`` see layers.scanned;
    ``attention`` (``model.attention``) serves the layers without attention dropout: inference,
    and training where ``attention_probs_dropout_prob`` is 0.
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    unroll_layers: bool = False
    attention: str = "auto"

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
            cfg, self.dtype, deterministic, self.attention, name="layers"
        )
        key_mask = attention_mask.astype(bool)[:, None, None, :]  # [B, heads, queries, keys]
        hidden, _ = layers(hidden, key_mask)
        return hidden
