"""What every reader of the data applies to a record: the one transform layer.

The training pipeline, the evaluation batches, fine-tuning and inference all turn stored
records and report texts into model inputs through these functions, so an X-ray, a CT volume or
a report reaches the model the same way whichever path read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def tokenize(reports: Sequence[str], tokenizer, max_length: int, prefix: str) -> dict:
    """Padded, truncated token ids and attention mask as int32 `<prefix>_text_{ids,mask}`."""
    encoded = tokenizer(
        list(reports),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    return {
        f"{prefix}_text_ids": encoded["input_ids"].astype(np.int32),
        f"{prefix}_text_mask": encoded["attention_mask"].astype(np.int32),
    }
