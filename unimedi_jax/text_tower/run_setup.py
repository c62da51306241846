"""The text tower a config asks for: a local Hugging Face BERT, or a from-scratch one.

From scratch (``text.path`` empty, as in the demo), the WordPiece vocabulary is built once from
the training reports and kept in ``workdir/tokenizer`` so a resumed run and the exported model
tokenise exactly as training did. The build is deterministic: two fresh runs of one config get
the same vocabulary, byte for byte.

With a local BERT (``text.path``), training copies its config and tokenizer files into
``workdir/text_tower`` at the start, and loading the run reads only that copy: a run folder moved
to another machine loads, evaluates, exports and resumes without ``text.path`` (the weights are
in the checkpoints). Runs trained before the copy existed still read ``text.path``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils

from data_pipelines.sources import report_texts
from unimedi_jax.core.run_folders import RUN_TEXT_TOWER
from unimedi_jax.models.text import BertConfig
from unimedi_jax.text_tower.hugging_face import load_hf_bert, read_bert_config
from unimedi_jax.text_tower.tokenizer import load_tokenizer, train_wordpiece_tokenizer

SCRATCH_VOCAB_SIZE = 2048
# What a run needs of ``text.path`` besides the weights: the BERT config and the tokenizer files
# (those present; a folder may hold tokenizer.json, vocab.txt or both).
TEXT_TOWER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


class TextTower(NamedTuple):
    config: BertConfig
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    params: dict | None  # pretrained weights, or None for a random init


def prepare_text_tower(config, workdir: Path) -> TextTower:
    """The text tower for training: pretrained weights from ``text.path``, or a from-scratch
    tower whose vocabulary is built from the training reports on first use.

    With ``text.path``, its config and tokenizer are first copied into the run (once); a run
    resumed where ``text.path`` is no longer readable gets no weights (``params`` None): they
    come from its checkpoint."""
    text_cfg = config.text
    if text_cfg.path:
        source, copy = Path(text_cfg.path), run_text_dir(workdir)
        if jax.process_index() == 0 and not (copy / "config.json").is_file():
            copy_text_files(source, copy)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("text tower files copied")
        tower = load_text_tower(config, workdir)
        if not (source / "config.json").is_file():
            return tower
        module, params = load_hf_bert(source)
        return tower._replace(config=module.config, params=params)
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
    or, in training, from ``prepare_text_tower``); a local BERT's come from the run's copy."""
    text_cfg = config.text
    if text_cfg.path:
        copy = run_text_dir(workdir)
        folder = copy if (copy / "config.json").is_file() else Path(text_cfg.path)
        return TextTower(read_bert_config(folder), load_tokenizer(folder), None)
    tokenizer = load_tokenizer(Path(workdir) / "tokenizer")
    return TextTower(scratch_bert_config(text_cfg, len(tokenizer)), tokenizer, None)


def run_text_dir(workdir: Path) -> Path:
    """Where a run keeps its copy of ``text.path``'s config and tokenizer."""
    return Path(workdir) / RUN_TEXT_TOWER


def copy_text_files(source: Path, dest: Path) -> None:
    """Copies ``TEXT_TOWER_FILES`` of a Hugging Face BERT folder into ``dest``, config.json last
    (through a temporary name) so a copy interrupted half-way is redone, not half-used."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TEXT_TOWER_FILES[1:]:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    shutil.copyfile(source / "config.json", dest / "config.json.tmp")
    (dest / "config.json.tmp").replace(dest / "config.json")


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
    """The BertConfig of the text tower a run of ``config`` in ``workdir`` would train, without
    reading weights: ``text.path``'s own while readable (the run's copy otherwise); a
    from-scratch vocabulary not built yet is built first, as training would."""
    path = config.text.path
    if path and (Path(path) / "config.json").is_file():
        return read_bert_config(Path(path))
    if path:
        return load_text_tower(config, workdir).config
    return prepare_text_tower(config, workdir).config
