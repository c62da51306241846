"""Zero-shot classification and retrieval benchmarks of a pre-trained checkpoint.

    python -m unimedi_jax.evaluate --config=configs/zero_shot.py:dataset=ct_rate \
        --workdir=runs/paper --out=results/ct_rate --config.data.data_dir=/data/tfds

``dataset`` names a benchmark of BENCHMARKS: the prepared dataset it reads (under
``data.data_dir``), the published protocol it follows (see ``unimedi_jax/evaluation/zero_shot.py``)
and the split it scores. The prompts are ``configs/prompts/<benchmark>.json``;
``--config.prompts=FILE.json`` replaces them. The model sizes come from the checkpoint's own
config.
"""

from __future__ import annotations

import ml_collections

from unimedi_jax.evaluation import tasks

FILE = "configs/zero_shot.py"
# benchmark -> (the prepared dataset it reads, its protocol, the split it scores).
BENCHMARKS = {
    # CT-CLIP's 18 abnormalities on CT-RATE's official validation volumes (our test split)
    "ct_rate": ("ct_rate", "ct_clip_18", "test"),
    # the same protocol on RAD-ChestCT, the external set (its labels shared with CT-RATE)
    "rad_chestct": ("rad_chestct", "ct_clip_18", "test"),
    # pneumonia vs normal prompts, on the split the probe tests on
    "rsna_pneumonia": ("rsna_pneumonia", "rsna_zero_shot", "test"),
    # GLoRIA drew its 5x200 from CheXpert's training images (the official valid set has 234)
    "chexpert_5x200": ("chexpert", "gloria_5x200", "train"),
    "mimic_5x200": ("mimic_cxr_jpg", "gloria_5x200", "test"),
}
DATASETS = tuple(BENCHMARKS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``zero_shot.py:dataset=NAME`` -> the zero-shot config of that benchmark."""
    benchmark = tasks.parse_arg(arg, FILE, ("dataset",))["dataset"]
    if benchmark not in BENCHMARKS:
        raise tasks.ProtocolError(
            f"{FILE}: dataset={benchmark!r} has no zero-shot protocol; valid: {', '.join(DATASETS)}"
        )
    c = ml_collections.ConfigDict()
    c.kind = "zero_shot"
    c.benchmark = benchmark
    c.dataset, c.protocol, c.split = BENCHMARKS[benchmark]
    c.prompts = ""  # a JSON prompt file; "": the shipped configs/prompts/<benchmark>.json
    c.limit = 0  # records read; 0: all (CT-RATE, RSNA)
    c.per_class = 200  # 5x200: images drawn per class
    c.seed = 0  # 5x200: the draw

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "/data/tfds"
    # 3D: the HU range mapped to [0, 1]; empty: the pre-training run's window
    c.data.hu_window = ()

    c.batch_size = 16  # encoder forward batch
    c.bootstrap = ml_collections.ConfigDict({"samples": 1000, "seed": 0})  # AUROC intervals
    return c
