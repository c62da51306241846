"""The text tower's tokenizer: transformers' fast BERT tokenizer read from a folder, and the
deterministic WordPiece vocabulary a from-scratch tower builds from the training reports.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

from unimedi_jax.models.text import TextModelError

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

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
