"""The text tower a config asks for: a local Hugging Face BERT, or a from-scratch one.

From scratch (``text.path`` empty, as in the demo), the WordPiece vocabulary is built once from
the training reports and kept in ``workdir/tokenizer`` so a resumed run and the exported model
tokenise exactly as training did.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax

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
    if not (tokenizer_dir / "tokenizer.json").exists():
        # Every process builds the same vocabulary; only process 0 keeps it in the workdir.
        target = tokenizer_dir if jax.process_index() == 0 else Path(tempfile.mkdtemp())
        train_wordpiece_tokenizer(
            report_texts(config), text_cfg.vocab_size or SCRATCH_VOCAB_SIZE, target
        )
        return load_text_tower(config, workdir, tokenizer_dir=target)
    return load_text_tower(config, workdir)


def load_text_tower(config, workdir: Path, tokenizer_dir: Path | None = None) -> TextTower:
    """Config and tokenizer of a run's text tower, without weights (they come from a checkpoint
    or, in training, from ``prepare_text_tower``)."""
    text_cfg = config.text
    if text_cfg.path:
        return TextTower(read_bert_config(Path(text_cfg.path)), load_tokenizer(text_cfg.path), None)
    tokenizer = load_tokenizer(tokenizer_dir or Path(workdir) / "tokenizer")
    bert = BertConfig.from_scratch(
        vocab_size=len(tokenizer),
        hidden_size=text_cfg.hidden_size,
        num_hidden_layers=text_cfg.num_layers,
        num_attention_heads=text_cfg.num_heads,
        intermediate_size=text_cfg.intermediate_size,
        max_position_embeddings=max(text_cfg.max_length, 128),
    )
    return TextTower(bert, tokenizer, None)
