"""The same step on 8 fake CPU devices with meshes (8,1,1), (2,2,2) and on 1 device: same losses."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tests.fake_devices import fake_device_flags

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    from configs.pretrain import get_config
    from test_train_step import VOCAB, tiny_batch
    from unimedi_jax.core import sharding
    from unimedi_jax.models.text import BertConfig
    from unimedi_jax.text_tower.run_setup import TextTower
    from unimedi_jax.trainers.pretraining import build_trainer

    config = get_config("tiny")
    text = TextTower(BertConfig.from_scratch(VOCAB, 32, 1, 4, 64, 32), None, None)
    batches = [tiny_batch(config, ("image", "volume"), seed=i) for i in range(3)]
    KEYS = ("loss", "loss_vl", "loss_icl", "loss_pcl")
    results = {}
    for name, shape, devices in [
        ("1 device", (1, 1, 1), jax.devices()[:1]),
        ("(8,1,1)", (8, 1, 1), None),
        ("(2,2,2)", (2, 2, 2), None),
    ]:
        mesh = sharding.make_mesh(*shape, devices=devices)
        trainer = build_trainer(config, text, mesh, total_steps=10, warmup_steps=2)
        state, losses = trainer.state, []
        for batch in batches:
            state, metrics = trainer.step(state, sharding.global_batch(batch, mesh))
            losses.append({k: float(metrics[k]) for k in KEYS})
        results[name] = losses
    print("RESULT " + json.dumps(results))
    """
)


def test_losses_equal_across_meshes():
    env = {
        **os.environ,
        "XLA_FLAGS": fake_device_flags(8),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT ") :])
    reference = results.pop("1 device")
    for name, losses in results.items():
        for step, (got, want) in enumerate(zip(losses, reference, strict=True)):
            for key in want:
                np.testing.assert_allclose(
                    got[key], want[key], atol=1e-5, rtol=1e-5, err_msg=f"{name} step {step} {key}"
                )
