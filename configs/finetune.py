"""Full fine-tuning of the vision encoder for 3D classification (paper Table 3).

    python -m unimedi_jax.finetune --config=configs/finetune.py:dataset=cc_ccii \
        --workdir=runs/paper --out=runs/paper/finetune/cc_ccii

(``python -m unimedi_jax.main`` with the same flags does the same: it dispatches on ``kind``.)

``dataset`` is a labelled 3D dataset prepared under ``data.data_dir`` (cc_ccii, luna16,
phantoms/ct). The paper gives AdamW, batch 8, random flips and 50 epochs (CC-CCII) or 100
(LUNA16); the learning rate, weight decay and the cosine schedule's warm-up are not in the paper
and are ours. A linear head on the encoder's final-norm [CLS] feature is trained with the whole
encoder; the epoch with the lowest validation loss is tested.
"""

from __future__ import annotations

import ml_collections

from unimedi_jax.evaluation import tasks

FILE = "configs/finetune.py"
DATASET_EPOCHS = {"luna16": 100}  # the paper's appendix (7.1); 50 otherwise


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``finetune.py:dataset=NAME`` -> the fine-tuning config of that 3D dataset."""
    args = tasks.parse_arg(arg, FILE, ("dataset",))
    dataset = tasks.resolve(args["dataset"], modality="3d", field=f"{FILE}: dataset").name
    c = ml_collections.ConfigDict()
    c.kind = "finetune"
    c.dataset = dataset
    c.seed = 0  # head init, batch order and flips
    c.random_init = False  # True: train the checkpoint's architecture from scratch
    c.log_every_steps = 50

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "/data/tfds"
    # 3D: the HU range mapped to [0, 1]; empty: the pre-training run's window
    c.data.hu_window = ()
    c.data.read_threads = 8  # threads reading and windowing training volumes

    c.splits = ml_collections.ConfigDict(tasks.SPLITS)

    c.train = ml_collections.ConfigDict()
    c.train.epochs = DATASET_EPOCHS.get(dataset, 50)
    c.train.batch_size = 8  # a multiple of the local device count
    c.train.eval_batch_size = 16
    c.train.learning_rate = 1e-4  # peak of the cosine schedule
    c.train.init_learning_rate = 0.0
    c.train.end_learning_rate = 0.0
    c.train.warmup_epochs = 5
    c.train.weight_decay = 0.05
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.grad_clip_norm = 1.0  # 0 disables
    c.train.flip_axes = (0, 1, 2)  # volume axes (D, H, W) each flipped with probability 1/2 (host)
    return c
