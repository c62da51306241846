"""Runs saved by older versions: their config.json lacks the fields added since, and
``upgrade_config`` fills each with the value that reproduces how that version behaved."""

import json
import logging

import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.pretrain import PRESETS, get_config
from tests.tiny_runs import tiny_run_config
from unimedi_jax import inference
from unimedi_jax.config.checks import check_model, check_training
from unimedi_jax.config.preprocessing import before_recorded
from unimedi_jax.config.upgrade import ADDED_FIELDS, upgrade_config
from unimedi_jax.models.text import BertConfig
from unimedi_jax.models.unimedi import build_unimedi
from unimedi_jax.trainers.pretraining import train

# What the versions before each field did, written out independently of ADDED_FIELDS.
OLD_BEHAVIOUR = {
    "kind": "pretrain",
    "model.pixel_mean": 0.0,
    "model.pixel_std": 1.0,
    "model.unroll_layers": False,
    "text.pooling": "cls",
    "selection.layers": "all",
    "masking.per_part": False,
    "masking.unmasked_tuning_fraction": 0.0,
    "vision_weights": "teacher",
    "loss.contrast": "joint",
    "loss.pcl_tokens": "masked",
    "train.clip_mode": "global",
    "train.on_nonfinite": "stop",
    "mesh.preset": "dp",
    "data.max_failure_fraction": 1.0,  # unusable records were replaced without a limit
    "evals": ("retrieval",),
    "eval_split": "validation",
    "eval_limit": 500,
    "probe_train_limit": 2000,
    "keep_checkpoint_every_steps": 0,
    "on_shape_change": "refuse",
}


def _as_older_version(config: dict) -> dict:
    """``config`` (a config.json's dict) without every field a newer version added."""
    for dotted, _ in ADDED_FIELDS:
        *sections, name = dotted.split(".")
        node = config
        for section in sections:
            node = node.get(section, {})  # gone with an older field (eval_settings)
        node.pop(name, None)  # a preset has no `preprocessing`: runs record it at their start
    return config


def _field(config, dotted: str):
    for name in dotted.split("."):
        config = config[name]
    return config


def test_todays_configs_come_back_unchanged():
    for preset in PRESETS:
        config = get_config(preset)
        config.preprocessing = before_recorded(config)  # as a run records it at its start
        assert upgrade_config(config).to_dict() == config.to_dict(), preset


def test_an_older_config_gets_the_old_behaviour_and_builds():
    older = ml_collections.ConfigDict(_as_older_version(get_config("tiny").to_dict()))
    upgraded = upgrade_config(older)
    assert "pooling" not in older.text  # the saved config itself is left as it was
    assert set(OLD_BEHAVIOUR) <= {dotted for dotted, _ in ADDED_FIELDS}
    for dotted, value in OLD_BEHAVIOUR.items():
        assert _field(upgraded, dotted) == value, dotted
    check_model(upgraded)
    check_training(upgraded)
    text = BertConfig.from_scratch(50, 32, 1, 4, 64, max_position_embeddings=32)
    model = build_unimedi(upgraded, text, jnp.float32)
    assert (model.vision.pixel_mean, model.vision.pixel_std) == (0.0, 1.0)
    assert model.text_pooling == "cls" and model.vision.attention_layers == "all"


def test_an_older_run_is_evaluated_and_resumed(tmp_path, caplog):
    """A run whose config.json an older version wrote loads for inference (with the old input
    scaling), and a rerun of its command resumes it, naming only the field really changed."""
    config = tiny_run_config(
        tmp_path / "data", total_steps=2, checkpoint_every_steps=2, log_every_steps=1
    )
    for dotted, value in OLD_BEHAVIOUR.items():  # the run as that older version made it
        *sections, name = dotted.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    run = tmp_path / "run"
    train(config, run)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(_as_older_version(saved)))

    loaded = inference.load(run)
    assert loaded.config.model.pixel_mean == 0.0 and loaded.config.text.pooling == "cls"
    image = np.random.default_rng(0).random((2, *config.model.image_size), dtype=np.float32)
    embeddings = loaded.embed_images(image)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)

    config.total_steps = 3
    with caplog.at_level(logging.WARNING):
        train(config, run)
    # The older version's XLA attention becomes today's default, and the resume says so.
    assert "changed config: model.attention xla -> auto, total_steps 2 -> 3" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
