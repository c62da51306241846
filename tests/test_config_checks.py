"""Start-up config checks: each bad value gets a message naming its field."""

import pytest

from configs.pretrain import get_config
from unimedi_jax.config.checks import ConfigError, check_batch_for_mesh, check_config
from unimedi_jax.config.overrides import check_override_names


def test_presets_pass():
    for preset in ("paper", "demo", "tiny"):
        config = get_config(preset)
        config.text.path = ""  # the paper's BioClinicalBERT directory is not on this machine
        check_config(config)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model.image_size", (30, 32), r"model.image_size=\(30, 32\) is not divisible"),
        ("model.volume_size", (9, 32, 32), r"model.volume_size=\(9, 32, 32\)"),
        ("model.num_heads", 5, "model.width=32 is not divisible by model.num_heads=5"),
        ("model.remat", "sometimes", "model.remat='sometimes'"),
        ("selection.k", 9, r"selection.k=9 must be between 1 and the volume depth"),
        ("selection.mode", "best", "selection.mode='best'"),
        ("masking.mode", "half", "masking.mode='half'"),
        ("loss.pcl_tokens", "some", "loss.pcl_tokens='some'; valid: .'masked', 'all'"),
        ("train.clip_mode", "per_layer", "train.clip_mode='per_layer'; valid: .'global'"),
        ("selection.layers", "first", "selection.layers='first'; valid: .'all', 'last'"),
        ("masking.ratio", 1.0, r"masking.ratio=1.0 must be in \[0, 1\)"),
        ("precision.compute_dtype", "fp8", "precision.compute_dtype='fp8'"),
        ("text.path", "/nowhere/bert", "text.path='/nowhere/bert' is not a Hugging Face"),
        ("text.pooling", "max", "text.pooling='max'; valid: .'cls', 'mean'"),
    ],
)
def test_bad_values_name_their_field(field, value, message):
    config = get_config("tiny")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_batch_must_split_over_data_parallel_devices():
    config = get_config("tiny")
    config.batch.size_3d = 6
    check_batch_for_mesh(config, 2)
    with pytest.raises(ConfigError, match=r"batch.size_3d=6 is not divisible by .* 4"):
        check_batch_for_mesh(config, 4)


def test_unknown_override_names_the_closest_fields():
    argv = ["main", "--config=configs/pretrain.py:tiny", "--config.model.widht=3"]
    with pytest.raises(ConfigError, match=r"Did you mean model\.width"):
        check_override_names(argv)
    with pytest.raises(ConfigError, match=r"modle is not a config field\. Did you mean model"):
        check_override_names(["main", "--config=configs/pretrain.py", "--config.modle.width=3"])
    check_override_names(["main", "--config=configs/pretrain.py:demo", "--config.batch.size_2d=4"])
