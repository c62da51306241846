"""Inference API: load a trained checkpoint; embed images, volumes and texts; select slices.

    model = inference.load("runs/demo")               # a workdir or one of its checkpoint dirs
    image_emb = model.embed_images(xrays)             # [N, H, W] float in [0, 1] -> [N, E]
    image_emb = model.embed_images(model.read_image("chest.dcm"))  # a file (PNG, JPEG, DICOM)
    volume_emb = model.embed_volumes(model.read_volume("ct.nii.gz"))  # or a DICOM series folder
    volume_emb = model.embed_volumes(cts)             # [N, D, H, W] -> [N, E], with slice selection
    text_emb = model.embed_texts(["No pleural effusion.", ...])
    indices, scores = model.select_slices(cts, k=4)

Every vision function uses the tower the run's ``vision_weights`` names (the student by default;
``weights="teacher"`` or ``"student"`` picks one). Array inputs are what the pipeline's eval
transforms produce; ``read_image`` / ``read_volume`` produce them from files with the
preprocessing the run recorded (config.json's ``preprocessing``). Work is batched internally
with a fixed batch size (the last batch padded), so each input shape compiles once. The
functions are ``evaluation.predict``'s, which in-loop evaluation runs on the sharded training
state; they live in ``evaluation.trained_model``, below evaluation, export and training, which
use them too.
"""

from data_pipelines.transforms import InputFileError
from unimedi_jax.evaluation.trained_model import (
    RunNotFoundError,
    UniMedIInference,
    as_float,
    load,
    load_config,
    local_mesh,
    resolve_run,
)

__all__ = [
    "InputFileError",
    "RunNotFoundError",
    "UniMedIInference",
    "as_float",
    "load",
    "load_config",
    "local_mesh",
    "resolve_run",
]
