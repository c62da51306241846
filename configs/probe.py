"""Linear-probe evaluation of a pre-trained encoder (paper Tables 1 and 2).

    python -m unimedi_jax.evaluate --config=configs/probe.py:dataset=chexpert,fraction=0.01 \
        --workdir=runs/paper

``dataset`` is a labelled dataset prepared under ``data.data_dir`` (chexpert, rsna_pneumonia,
covidx, cc_ccii, luna16, phantoms/xray, phantoms/ct); ``fraction`` is 0.01, 0.1 or 1.0, all
three when left out. The probe's optimiser settings are the paper's appendix values (AdamW,
lr 5e-4, wd 1e-6, batch 48, up to 50 epochs, early stop after 10 without a lower validation
loss), with its per-dataset exceptions: COVIDx lr 5e-3, CC-CCII batch 8. The model sizes come
from the checkpoint's own config. ``--config.random_init=True`` gives the "Random Init" row: the
checkpoint's architecture with freshly initialised weights.
"""

from __future__ import annotations

import ml_collections

from unimedi_jax.evaluation import tasks

FILE = "configs/probe.py"
# The paper's appendix (7.1): lr 5e-3 for COVIDx, batch 8 for CC-CCII.
DATASET_PROBE = {"covidx": {"learning_rate": 5e-3}, "cc_ccii": {"batch_size": 8}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``probe.py:dataset=NAME[,fraction=F]`` -> the probe config of that dataset."""
    args = tasks.parse_arg(arg, FILE, ("dataset", "fraction"))
    dataset = tasks.resolve(args["dataset"], field=f"{FILE}: dataset").name
    c = ml_collections.ConfigDict()
    c.kind = "probe"
    c.dataset = dataset
    c.fractions = tasks.parse_fractions(args.get("fraction"), FILE)
    c.seed = 0  # label-fraction sampling, head init and batch order
    c.random_init = False  # True: the checkpoint's architecture, fresh weights (Random Init)

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "/data/tfds"
    # 3D: the HU range mapped to [0, 1]; empty: the pre-training run's window
    c.data.hu_window = ()

    c.splits = ml_collections.ConfigDict(tasks.SPLITS)
    c.limit = ml_collections.ConfigDict(dict.fromkeys(tasks.ROLES, 0))  # records; 0: all

    c.features = ml_collections.ConfigDict()
    c.features.with_slices = False  # 3D: add the attentively selected slices, as in training
    c.features.batch_size = 16  # encoder forward batch

    c.probe = ml_collections.ConfigDict(
        {
            "learning_rate": 5e-4,
            "weight_decay": 1e-6,
            "batch_size": 48,
            "max_epochs": 50,
            "patience": 10,
        }
    )
    c.probe.update(DATASET_PROBE.get(dataset, {}))
    return c
