"""Checkpoint hygiene: which checkpoints are kept, a workdir whose saved config has other shapes
is refused (or moved aside when asked), metrics are rewound on resume, and the new config
fields are checked at start."""

import json
import logging
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pretrain import get_config
from unimedi_jax.config.checks import ConfigError, check_config
from unimedi_jax.config.preprocessing import before_recorded
from unimedi_jax.text_tower.run_setup import text_tower_config
from unimedi_jax.text_tower.tokenizer import train_wordpiece_tokenizer
from unimedi_jax.train.checkpoint import Checkpointer
from unimedi_jax.train.metric_writer import MetricWriter, rewind_jsonl
from unimedi_jax.train.workdir import abstract_train_state, check_workdir, record_config

REPORTS = ["no acute findings", "small left pleural effusion", "right lower lobe nodule"]


def _tiny():
    """The tiny preset as ``train`` passes it to ``check_workdir``: with the preprocessing
    group it records at the start of a run (for phantoms, what ``before_recorded`` gives)."""
    config = get_config("tiny")
    config.preprocessing = before_recorded(config)
    return config


def test_keeps_the_latest_k_plus_every_mth(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=2, keep_every=4)
    for step in range(1, 11):
        checkpointer.save(step, {"w": jnp.full((2,), float(step))}, {"step": step})
    checkpointer.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 8, 9, 10]
    assert float(Checkpointer(tmp_path, keep=2).restore_raw(4)["w"][0]) == 4.0


def _previous_run(workdir, config):
    """A workdir as a run of ``config`` leaves it: config.json, its vocabulary, a checkpoint of
    its train state's shapes, metrics."""
    check_workdir(config, workdir)
    record_config(config, workdir)
    train_wordpiece_tokenizer(REPORTS, 64, workdir / "tokenizer")
    state = abstract_train_state(config, text_tower_config(config, workdir))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=1, async_save=False, clean_up=True)
    checkpointer.save(2, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), state), {})
    checkpointer.close()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    return json.loads((workdir / "config.json").read_text())


def test_workdir_with_other_shapes_is_refused_naming_the_params_and_fields(tmp_path):
    saved = _previous_run(tmp_path, _tiny())
    config = _tiny()
    config.model.width = 48
    config.text.hidden_size = 64
    with pytest.raises(ConfigError) as error:
        check_workdir(config, tmp_path)
    message = str(error.value)
    assert "holds checkpoints (newest: step 2)" in message
    # The first parameters in path order, with their saved and new shapes, and how many more.
    assert (
        "other shapes than this config gives: params/dino_head/mlp_0/kernel float32[32, 32] -> "
        "float32[48, 32], params/image_proj/Dense_0/kernel float32[32, 16] -> float32[48, 16], "
        "params/text/embeddings/norm/bias float32[32] -> float32[64] and 167 more arrays "
        "(saved -> now)" in message
    )
    assert "config.json differs in model.width 32 -> 48, text.hidden_size 32 -> 64" in message
    assert "--config.on_shape_change=restart" in message and "\n" not in message
    assert json.loads((tmp_path / "config.json").read_text()) == saved  # not overwritten


def test_changed_optimizer_make_up_is_a_shape_change(tmp_path):
    """No hand-kept list of fields: a change that only the optimizer state shows is caught."""
    _previous_run(tmp_path, _tiny())
    config = _tiny()
    config.train.grad_clip_norm = 0.0  # no clipping: one transformation less in the chain
    with pytest.raises(
        ConfigError, match=r"opt_state/0/count absent -> int32\[\].*train.grad_clip_norm 3.0 -> 0.0"
    ):
        check_workdir(config, tmp_path)


def test_same_shapes_resume_with_an_older_runs_config(tmp_path, caplog):
    """A config.json an older version wrote (fields added since are missing) is upgraded before
    the comparison: only the fields that really changed are named."""
    _previous_run(tmp_path, _tiny())
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["kind"], saved["text"]["pooling"], saved["selection"]["layers"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = _tiny()
    with caplog.at_level(logging.WARNING):
        check_workdir(config, tmp_path)  # the tiny config pools reports by their mean
    assert "changed config: text.pooling cls -> mean" in caplog.text


def test_other_changes_resume_with_a_warning(tmp_path, caplog):
    _previous_run(tmp_path, _tiny())
    config = _tiny()
    previous = config.train.learning_rate
    config.train.learning_rate = previous / 10
    with caplog.at_level(logging.WARNING):
        check_workdir(config, tmp_path)
    record_config(config, tmp_path)
    assert f"train.learning_rate {previous} -> {previous / 10}" in caplog.text
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["learning_rate"] == previous / 10


def test_restart_moves_the_previous_run_aside(tmp_path):
    _previous_run(tmp_path, _tiny())
    config = _tiny()
    config.model.depth = 3
    config.on_shape_change = "restart"
    check_workdir(config, tmp_path)
    record_config(config, tmp_path)
    (previous,) = tmp_path.glob("previous-*")
    assert sorted(p.name for p in previous.iterdir()) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "tokenizer",
    ]
    assert json.loads((previous / "config.json").read_text())["model"]["depth"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["model"]["depth"] == 3
    assert not (tmp_path / "checkpoints").exists()
    check_workdir(config, tmp_path)  # a rerun of the same command: nothing more to move
    assert len(list(tmp_path.glob("previous-*"))) == 1


def _tensorboard_tags(logdir) -> list[str]:
    """Scalar tags of an event file, read as TFRecords: u64 length, u32 crc, data, u32 crc."""
    from tensorboardX.proto import event_pb2

    tags = []
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            tags.extend(value.tag for value in event.summary.value)
            offset += 12 + length + 4
    return tags


def test_metric_names_reach_tensorboard_without_a_log_line_each(tmp_path, caplog):
    writer = MetricWriter(tmp_path)
    with caplog.at_level(logging.INFO):
        writer.write(3, {"retrieval_image/image_to_text/R@10": 0.25, "loss": 1.5})
    writer.close()
    assert not [r for r in caplog.records if "illegal" in r.getMessage()]
    assert sorted(_tensorboard_tags(tmp_path / "tensorboard")) == [
        "loss",
        "retrieval_image/image_to_text/R_10",
    ]
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["retrieval_image/image_to_text/R@10"] == 0.25  # the jsonl keeps the name


def test_rewind_drops_later_and_cut_short_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed while writing step 5
    rewind_jsonl(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    rewind_jsonl(path, 2)  # nothing to drop: unchanged
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("train.on_nonfinite", "ignore", "train.on_nonfinite='ignore'; valid: .'stop', 'skip'"),
        ("on_shape_change", "overwrite", "on_shape_change='overwrite'; valid"),
        ("data.max_failure_fraction", 1.5, r"data.max_failure_fraction=1.5 must be in \[0, 1\]"),
        ("keep_checkpoints", 0, "keep_checkpoints=0 must be at least 1"),
        ("keep_checkpoint_every_steps", -5, "keep_checkpoint_every_steps=-5 at least 0"),
    ],
)
def test_new_fields_are_checked_at_start(field, value, message):
    config = _tiny()
    *sections, name = field.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[name] = value
    with pytest.raises(ConfigError, match=message):
        check_config(config)
