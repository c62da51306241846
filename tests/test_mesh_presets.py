"""Mesh presets: config fields -> axis sizes, and the start-up checks that name what to change."""

import jax
import pytest

from configs.pretrain import get_config
from unimedi_jax.config.checks import ConfigError, check_mesh
from unimedi_jax.core import sharding


def mesh_config(preset: str, data: int = 0, fsdp: int = 0, tensor: int = 0):
    config = get_config("tiny")
    config.mesh.update(preset=preset, data=data, fsdp=fsdp, tensor=tensor)
    return config


@pytest.mark.parametrize(
    ("preset", "fields", "devices", "want"),
    [
        ("dp", (0, 0, 0), 8, (8, 1, 1)),
        ("fsdp", (0, 0, 0), 8, (1, 8, 1)),
        ("fsdp_tp", (0, 0, 0), 8, (1, 4, 2)),
        ("fsdp_tp", (0, 0, 4), 8, (1, 2, 4)),  # a field replaces the preset's size
        ("fsdp", (2, 0, 0), 16, (2, 8, 1)),  # FSDP inside each half, data parallel across
        ("dp", (0, 2, 0), 8, (4, 2, 1)),
        ("dp", (2, 2, 2), 8, (2, 2, 2)),
    ],
)
def test_preset_sizes(preset, fields, devices, want):
    sizes = sharding.preset_mesh_sizes(preset, *fields)
    assert sharding.fill_mesh_sizes(*sizes, devices) == want
    check_mesh(mesh_config(preset, *fields), devices)


def test_paper_config_is_data_parallel_and_vit_l16_is_fsdp():
    one = jax.devices()[:1]
    for name, preset in (("paper", "dp"), ("vit_l16", "fsdp")):
        config = get_config(name)
        assert config.mesh.preset == preset
        mesh = sharding.mesh_from_config(config.mesh, devices=one)
        assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    ("preset", "fields", "devices", "match"),
    [
        ("zero", (0, 0, 0), 8, r"mesh.preset='zero'; valid: \['dp', 'fsdp', 'fsdp_tp'\]"),
        ("fsdp", (-1, 0, 0), 8, r"mesh.data=-1, mesh.fsdp=-1.*at most one may be -1"),
        ("fsdp", (0, 3, 0), 8, r"mesh.preset='fsdp' with .*mesh.fsdp=3.*device count \(8\)"),
        ("dp", (0, 0, -2), 8, r"mesh.tensor=-2: each must be a positive integer"),
        ("fsdp_tp", (0, 2, -1), 6, r"model.num_heads=4 does not split over .* size 3"),
        ("fsdp_tp", (0, 0, 8), 8, r"model.num_heads=4 .* mesh.tensor=8\); set mesh.tensor"),
    ],
)
def test_mesh_errors_name_the_fields(preset, fields, devices, match):
    with pytest.raises(ConfigError, match=match):
        check_mesh(mesh_config(preset, *fields), devices)


def test_tensor_size_must_split_a_scratch_text_tower():
    config = mesh_config("fsdp_tp")
    config.text.num_heads = 3
    with pytest.raises(ConfigError, match=r"text.num_heads=3 does not split .* size 2"):
        check_mesh(config, 8)
    config.text.path = "/models/bert"  # a pretrained tower brings its own sizes
    check_mesh(config, 8)
