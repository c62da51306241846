"""The text tower a config asks for: a local Hugging Face BERT, or a from-scratch one.

From scratch (``text.path`` empty, as in the demo), the WordPiece vocabulary is built once from
the training reports and kept in ``workdir/tokenizer`` so a resumed run and the exported model
tokenise exactly as training did. The build is deterministic: two fresh runs of one config get
the same vocabulary, byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils

from data_pipelines.pipeline import report_texts
from unimedi_jax.models.text import (
    BertConfig,
    load_hf_bert,
    load_tokenizer,
    read_bert_config,
    train_wordpiece_tokenizer,
)

SCRATCH_VOCAB_SIZE = 2048


class TextTower(NamedTuple):
    config: BertConfig
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    params: dict | None  # pretrained weights, or None for a random init


def prepare_text_tower(config, workdir: Path) -> TextTower:
    """The text tower for training: pretrained weights from ``text.path``, or a from-scratch
    tower whose vocabulary is built from the training reports on first use."""
    text_cfg = config.text
    if text_cfg.path:
        module, params = load_hf_bert(text_cfg.path)
        return TextTower(module.config, load_tokenizer(text_cfg.path), params)
    tokenizer_dir = Path(workdir) / "tokenizer"
    # Every process would build the same vocabulary (train_wordpiece_tokenizer is a function of
    # the reports alone); process 0 alone writes it so no two processes write the same files.
    if jax.process_index() == 0 and not (tokenizer_dir / "tokenizer.json").exists():
        train_wordpiece_tokenizer(
            report_texts(config), text_cfg.vocab_size or SCRATCH_VOCAB_SIZE, tokenizer_dir
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("from-scratch tokenizer written")
    return load_text_tower(config, workdir)


def load_text_tower(config, workdir: Path) -> TextTower:
    """Config and tokenizer of a run's text tower, without weights (they come from a checkpoint
    or, in training, from ``prepare_text_tower``)."""
    text_cfg = config.text
    if text_cfg.path:
        return TextTower(read_bert_config(Path(text_cfg.path)), load_tokenizer(text_cfg.path), None)
    tokenizer = load_tokenizer(Path(workdir) / "tokenizer")
    return TextTower(scratch_bert_config(text_cfg, len(tokenizer)), tokenizer, None)


def scratch_bert_config(text_cfg, vocab_size: int) -> BertConfig:
    """The from-scratch BERT of ``config.text``'s sizes over a vocabulary of ``vocab_size``."""
    return BertConfig.from_scratch(
        vocab_size=vocab_size,
        hidden_size=text_cfg.hidden_size,
        num_hidden_layers=text_cfg.num_layers,
        num_attention_heads=text_cfg.num_heads,
        intermediate_size=text_cfg.intermediate_size,
        max_position_embeddings=max(text_cfg.max_length, 128),
    )


def text_tower_config(config, workdir: Path) -> BertConfig:
    """The BertConfig of the text tower a run of ``config`` in ``workdir`` uses, without reading
    weights; a from-scratch vocabulary not built yet is built first, as training would."""
    if config.text.path:
        return load_text_tower(config, workdir).config
    return prepare_text_tower(config, workdir).config
