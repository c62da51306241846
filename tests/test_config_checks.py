"""Start-up config checks: each bad value gets a message naming its field."""

import pytest
from absl import flags
from ml_collections import config_flags

from configs.pretrain import get_config
from unimedi_jax.config.checks import ConfigError, check_batch_for_mesh, check_config
from unimedi_jax.core.overrides import check_override_names, parse_flags


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
        ("model.attention", "flash", "model.attention='flash'; valid: .'auto', 'xla', 'cudnn'"),
        ("selection.k", 9, r"selection.k=9 must be between 1 and the volume depth"),
        ("selection.mode", "best", "selection.mode='best'"),
        ("masking.mode", "half", "masking.mode='half'"),
        ("loss.pcl_tokens", "some", "loss.pcl_tokens='some'; valid: .'masked', 'all'"),
        ("train.clip_mode", "per_layer", "train.clip_mode='per_layer'; valid: .'global'"),
        ("selection.layers", "first", "selection.layers='first'; valid: .'all', 'last'"),
        ("masking.ratio", 1.0, r"masking.ratio=1.0 must be in \[0, 1\)"),
        ("masking.unmasked_tuning_fraction", 1.0, r"unmasked_tuning_fraction=1.0 must be in"),
        ("masking.image_ratio", 1.0, r"masking.image_ratio=1.0 must be in \[0, 1\), or below 0"),
        ("masking.volume_mode", "half", "masking.volume_mode='half'; valid: .'', 'attentive'"),
        ("loss.pcl_modalities", ("xray",), r"loss.pcl_modalities=\('xray',\) names \['xray'\]"),
        ("precision.compute_dtype", "fp8", "precision.compute_dtype='fp8'"),
        ("text.path", "/nowhere/bert", "text.path='/nowhere/bert' is not a Hugging Face"),
        ("text.pooling", "max", "text.pooling='max'; valid: .'cls', 'mean'"),
        ("data.phantom_lesions", "tiny", "data.phantom_lesions='tiny'; valid: .'lobar', 'small'"),
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
        check_override_names(argv, get_config("tiny"))
    with pytest.raises(ConfigError, match=r"modle is not a config field\. Did you mean model"):
        check_override_names(["main", "--config.modle.width=3"], get_config("paper"))
    check_override_names(["main", "--config.batch.size_2d=4"], get_config("demo"))


def _counting_config_file(tmp_path):
    """A config file that appends a line to ``runs.txt`` each time it is executed."""
    runs = tmp_path / "runs.txt"
    path = tmp_path / "counting.py"
    path.write_text(
        "import ml_collections\n"
        f"with open({str(runs)!r}, 'a') as f:\n"
        "    f.write('run\\n')\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.model = ml_collections.ConfigDict({'width': 8})\n"
        "    return c\n"
    )
    return path, runs


def test_overrides_are_checked_on_the_config_the_flag_loaded(tmp_path):
    """The config file runs once: the override names are checked against the config the
    ``--config`` flag loaded, not against a second execution of the file."""
    path, runs = _counting_config_file(tmp_path)
    argv = ["main", f"--config={path}", "--config.model.width=16"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    parse_flags(flag_values, argv)
    assert flag_values.config.model.width == 16
    assert runs.read_text() == "run\n"

    argv = ["main", f"--config={path}", "--config.model.widht=16"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    with pytest.raises(ConfigError, match=r"model\.widht is not a config field\. Did you mean"):
        parse_flags(flag_values, argv)
    assert runs.read_text() == "run\nrun\n"
