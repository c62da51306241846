"""Config errors caught at start, before any data is read or anything is compiled.

Each check raises ``ConfigError`` with one paragraph naming the field, the value and what to do;
``unimedi_jax.core.errors`` reports it without a traceback (exit 2).
"""

from __future__ import annotations

from pathlib import Path

import jax

from data_pipelines.synthetic_phantoms import LESION_SIZES
from unimedi_jax.core.errors import ConfigError
from unimedi_jax.core.precision import COMPUTE_DTYPES
from unimedi_jax.core.run_folders import RUN_TEXT_TOWER
from unimedi_jax.core.sharding import MESH_PRESETS, fill_mesh_sizes, preset_mesh_sizes
from unimedi_jax.method.selection import MODES, SELECTION_MODES
from unimedi_jax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from unimedi_jax.models.unimedi import MODALITIES, TEXT_POOLINGS
from unimedi_jax.models.vit import ATTENTION_LAYERS

ON_NONFINITE = ("stop", "skip")  # train.on_nonfinite
ON_SHAPE_CHANGE = ("refuse", "restart")  # on_shape_change (unimedi_jax.train.workdir)
VISION_WEIGHTS = ("student", "teacher")  # vision_weights: the tower a trained run is used with
PCL_TOKENS = ("masked", "all")  # loss.pcl_tokens: the patch positions L_pcl averages over
CLIP_MODES = ("global", "per_param")  # train.clip_mode (unimedi_jax.train.state)


def _check_divisible(field: str, size, patch, patch_field: str) -> None:
    for side, p in zip(size, patch, strict=True):
        if side % p:
            raise ConfigError(
                f"{field}={tuple(size)} is not divisible by {patch_field}={tuple(patch)}; "
                f"use a size that is a multiple of the patch size."
            )


def check_model(config) -> None:
    """Sizes that the tokenizers, the attention and slice selection can work with."""
    m = config.model
    _check_divisible("model.image_size", m.image_size, m.patch_2d, "model.patch_2d")
    _check_divisible("model.volume_size", m.volume_size, m.patch_3d, "model.patch_3d")
    _check_divisible("model.volume_size[1:]", m.volume_size[1:], m.patch_2d, "model.patch_2d")
    if m.width % m.num_heads:
        raise ConfigError(
            f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}."
        )
    if m.remat not in REMAT_POLICIES:
        raise ConfigError(f"model.remat={m.remat!r}; valid: {REMAT_POLICIES}.")
    if m.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attention={m.attention!r}; valid: {ATTENTION_IMPLEMENTATIONS} (cudnn needs a "
            "GPU and compute dtype bfloat16; auto picks it where it runs)."
        )
    depth = m.volume_size[0]
    if not 1 <= config.selection.k <= depth:
        raise ConfigError(
            f"selection.k={config.selection.k} must be between 1 and the volume depth in slices "
            f"({depth}, model.volume_size[0])."
        )


def check_training(config, workdir: Path | None = None) -> None:
    """Modes, ratios, precision, batch sizes and the text-model directory (which a run resumed
    in ``workdir`` no longer needs once it holds its copy of the config and tokenizer)."""
    for field, value, valid in (
        ("selection.mode", config.selection.mode, SELECTION_MODES),
        ("masking.mode", config.masking.mode, MODES),
        ("masking.image_mode", config.masking.image_mode, ("", *MODES)),
        ("masking.volume_mode", config.masking.volume_mode, ("", *MODES)),
        ("train.on_nonfinite", config.train.on_nonfinite, ON_NONFINITE),
        ("on_shape_change", config.on_shape_change, ON_SHAPE_CHANGE),
        ("text.pooling", config.text.pooling, TEXT_POOLINGS),
        ("selection.layers", config.selection.layers, ATTENTION_LAYERS),
        ("loss.pcl_tokens", config.loss.pcl_tokens, PCL_TOKENS),
        ("train.clip_mode", config.train.clip_mode, CLIP_MODES),
        ("vision_weights", config.vision_weights, VISION_WEIGHTS),
    ):
        if value not in valid:
            raise ConfigError(f"{field}={value!r}; valid: {valid}.")
    if config.total_steps != -1 and config.total_steps < 1:
        raise ConfigError(
            f"total_steps={config.total_steps}: use a positive number of steps, or -1 to train "
            f"for train.epochs={config.train.epochs} epochs of the 2D training set."
        )
    if config.total_steps == -1 and config.train.epochs < 1:
        raise ConfigError(
            f"train.epochs={config.train.epochs} with total_steps=-1 trains nothing; set "
            "train.epochs to at least 1 or total_steps to a positive number of steps."
        )
    if not 0.0 <= config.masking.ratio < 1.0:
        raise ConfigError(f"masking.ratio={config.masking.ratio} must be in [0, 1).")
    for m in MODALITIES:
        if config.masking[f"{m}_ratio"] >= 1.0:
            raise ConfigError(
                f"masking.{m}_ratio={config.masking[f'{m}_ratio']} must be in [0, 1), or below 0 "
                "for masking.ratio."
            )
    unknown = set(config.loss.pcl_modalities) - set(MODALITIES)
    if unknown:
        raise ConfigError(
            f"loss.pcl_modalities={tuple(config.loss.pcl_modalities)} names {sorted(unknown)}; "
            f"valid: {MODALITIES}."
        )
    if not 0.0 <= config.masking.unmasked_tuning_fraction < 1.0:
        raise ConfigError(
            f"masking.unmasked_tuning_fraction={config.masking.unmasked_tuning_fraction} must be "
            "in [0, 1) (0: the student's tokens are masked to the end)."
        )
    if not 0.0 <= config.data.max_failure_fraction <= 1.0:
        raise ConfigError(
            f"data.max_failure_fraction={config.data.max_failure_fraction} must be in [0, 1]."
        )
    if config.keep_checkpoints < 1 or config.keep_checkpoint_every_steps < 0:
        raise ConfigError(
            f"keep_checkpoints={config.keep_checkpoints} must be at least 1 and "
            f"keep_checkpoint_every_steps={config.keep_checkpoint_every_steps} at least 0 "
            "(0: keep no extra checkpoints)."
        )
    if config.precision.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"precision.compute_dtype={config.precision.compute_dtype!r}; valid: {COMPUTE_DTYPES}."
        )
    if config.batch.size_2d + config.batch.size_3d < 2:
        raise ConfigError(
            "batch.size_2d + batch.size_3d must be at least 2: the CLIP loss contrasts each pair "
            "with the others of the batch."
        )
    if not (config.data.sources_2d or config.data.sources_3d):
        raise ConfigError("data.sources_2d and data.sources_3d are both empty; name a dataset.")
    if config.data.phantom_lesions not in LESION_SIZES:
        raise ConfigError(
            f"data.phantom_lesions={config.data.phantom_lesions!r}; valid: {tuple(LESION_SIZES)}."
        )
    path = config.text.path
    copied = workdir is not None and (Path(workdir) / RUN_TEXT_TOWER / "config.json").is_file()
    if path and not copied and not (Path(path) / "config.json").is_file():
        raise ConfigError(
            f"text.path={path!r} is not a Hugging Face model directory (no config.json there). "
            "Download the model (e.g. emilyalsentzer/Bio_ClinicalBERT) to that path, or set "
            "--config.text.path='' to train a text tower from scratch."
        )


def check_batch_for_mesh(config, data_parallel: int) -> None:
    """Global batch sizes must split evenly over the data-parallel devices."""
    for field in ("size_2d", "size_3d"):
        size = config.batch[field]
        if size % data_parallel:
            raise ConfigError(
                f"batch.{field}={size} is not divisible by the data-parallel size {data_parallel} "
                "(mesh.data x mesh.fsdp); choose a multiple of it."
            )


def check_mesh(config, device_count: int) -> None:
    """A known preset, axis sizes that cover the devices, and a tensor-parallel size that splits
    the attention heads and MLP units (else those layers stay whole on every tensor device)."""
    m = config.mesh
    if m.preset not in MESH_PRESETS:
        raise ConfigError(f"mesh.preset={m.preset!r}; valid: {sorted(MESH_PRESETS)}.")
    try:
        sizes = fill_mesh_sizes(
            *preset_mesh_sizes(m.preset, m.data, m.fsdp, m.tensor), device_count
        )
    except ValueError as e:
        raise ConfigError(
            f"mesh.preset={m.preset!r} with mesh.data={m.data}, mesh.fsdp={m.fsdp}, "
            f"mesh.tensor={m.tensor} (0 takes the preset's size) gives {e}."
        ) from e
    tensor = sizes[2]
    split = [("model.num_heads", config.model.num_heads), ("model.mlp_dim", config.model.mlp_dim)]
    if not config.text.path:  # a pretrained tower's sizes come from its own config.json
        split += [
            ("text.num_heads", config.text.num_heads),
            ("text.intermediate_size", config.text.intermediate_size),
        ]
    for field, value in split:
        if value % tensor:
            raise ConfigError(
                f"{field}={value} does not split over the tensor-parallel size {tensor} "
                f"(mesh.preset={m.preset!r}, mesh.tensor={m.tensor}); set mesh.tensor to a "
                f"divisor of {value} or use mesh.preset='fsdp'."
            )


def check_config(config, workdir: Path | None = None) -> None:
    """Every start-up check; the mesh one needs the device count (after jax.distributed)."""
    check_model(config)
    check_training(config, workdir)
    check_mesh(config, jax.device_count())
