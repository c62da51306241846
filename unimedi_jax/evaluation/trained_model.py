"""A trained run loaded for use: its params, tokenizer and batched embedding functions.

What ``unimedi_jax.inference`` (the public API, documented there) gives users; evaluation, the
exports and the trainers' final evaluation use it from here, below that API. The functions are
``predict``'s, which in-loop evaluation runs on the sharded training state.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from data_pipelines import imaging
from data_pipelines.transforms import FilePreprocessing, tokenize
from unimedi_jax.config.checks import VISION_WEIGHTS
from unimedi_jax.config.upgrade import read_run_config
from unimedi_jax.core import sharding
from unimedi_jax.core.errors import ConfigError, UserError
from unimedi_jax.core.precision import compute_dtype
from unimedi_jax.core.run_folders import PRETRAIN, describe, run_kind
from unimedi_jax.evaluation.predict import Predictor
from unimedi_jax.models.unimedi import UniMedI, build_unimedi, init_inputs
from unimedi_jax.text_tower.run_setup import load_text_tower
from unimedi_jax.train.checkpoint import Checkpointer


class RunNotFoundError(UserError, FileNotFoundError):
    """A path that is not a pre-training run (or one of its checkpoints)."""


def resolve_run(path: str | Path) -> tuple[Path, int | None]:
    """(workdir, step) from a pre-training workdir (newest readable checkpoint: step None) or
    a ``checkpoints/<step>`` dir; refuses folders of other kinds before anything is read."""
    path = Path(path)
    workdir, step = path, None
    if path.parent.name == "checkpoints" and path.name.isdigit():
        workdir, step = path.parent.parent, int(path.name)
    kind = run_kind(workdir)
    if kind == PRETRAIN and (workdir / "config.json").exists():
        return workdir, step
    held = f"; it holds {describe(kind)}" if kind is not None else ""
    raise RunNotFoundError(
        f"{path} is neither a pre-training run's workdir (with its config.json) nor one of its "
        f"checkpoints (<workdir>/checkpoints/<step>){held}. Pass the folder given to "
        "unimedi_jax.main as --workdir."
    )


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    """The resolved config a run saved at its start, upgraded to today's fields."""
    return read_run_config(workdir)


def as_float(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def local_mesh() -> jax.sharding.Mesh:
    """One device of this process: where a loaded checkpoint is used."""
    return sharding.make_mesh(1, 1, 1, jax.local_devices()[:1])


class UniMedIInference:
    """A trained UniMedI's params with batched embedding functions (compiled once per shape).

    A thin user of ``evaluation.predict``: the same predict functions evaluate the training
    state in the loop, there on the training mesh (``mesh``), here by default on one device.
    ``step``: the checkpoint's step, when loaded from one (results record where they came from).
    """

    def __init__(
        self,
        config,
        model: UniMedI,
        params: dict,
        teacher: dict,
        tokenizer,
        batch_size: int = 16,
        step: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.config = config
        self.step = step
        self.model = model
        self.student = params
        self.teacher = {**params, **teacher}  # teacher vision + DINO head, student projections
        # What the run is used with (``vision_weights``): embeddings, features, exports.
        self.params = self.params_for(config.vision_weights)
        self.tokenizer = tokenizer
        self.predictor = Predictor(model, mesh or local_mesh(), batch_size)
        self.batch_size = self.predictor.batch_size

    def params_for(self, weights: str | None) -> dict:
        """The student's or the teacher's vision tower (None: the run's ``vision_weights``),
        with the student's text tower and projections either way."""
        if weights is None:
            return self.params
        if weights not in VISION_WEIGHTS:
            raise ConfigError(f"vision_weights={weights!r}; valid: {VISION_WEIGHTS}.")
        return self.teacher if weights == "teacher" else self.student

    @property
    def preprocessing(self) -> FilePreprocessing:
        """How this run turns files into inputs: its config.json's ``preprocessing``."""
        try:
            return FilePreprocessing.from_record(self.config.preprocessing)
        except ValueError as err:
            raise ConfigError(
                f"the run's config.json records a preprocessing this version cannot apply: "
                f"{err}. Read it with the version that trained the run, or pass arrays."
            ) from err

    def read_image(self, path: imaging.PathLike) -> np.ndarray:
        """An X-ray file (PNG, JPEG, DICOM: MONOCHROME1 inverted, VOI LUT or window applied)
        -> float32 [1, crop, crop], as the run's stored records were: a batch of one for
        ``embed_images``."""
        try:
            return self.preprocessing.image(path)[None]
        except ValueError as err:  # the run recorded no stored X-ray size
            raise ConfigError(
                f"{path}: {err} (the run's config.json). Pass embed_images an array [N, H, W] "
                "in [0, 1]."
            ) from err

    def read_volume(self, path: imaging.PathLike, intensity: str = imaging.AUTO) -> np.ndarray:
        """A CT (a NIfTI file, a multi-frame DICOM file or a folder holding a DICOM series:
        the largest series, slices by position) -> float32 [1, D, H, W], canonically
        oriented, resized and HU-windowed as the run's stored records were. ``intensity``:
        what its values are, "auto" (HU, refused when they cannot be), "hu" or "windowed:MAX"
        (0..MAX spans the run's window), as ``data_pipelines.imaging.as_hounsfield``."""
        return self.preprocessing.volume(path, intensity)[None]

    def image_features(self, images: np.ndarray, weights: str | None = None) -> np.ndarray:
        """Final-norm [CLS] features [N, width] of X-rays [N, H, W]: linear-probe inputs."""
        return self.predictor.cls_features(self.params_for(weights), as_float(images))

    def volume_features(
        self, volumes: np.ndarray, with_slices: bool = False, weights: str | None = None
    ) -> np.ndarray:
        """[CLS] features of volumes alone (what the PyTorch export reproduces) or with slices."""
        k = self.config.selection.k if with_slices else 0
        return self.predictor.cls_features(self.params_for(weights), as_float(volumes), k)

    def embed_images(self, images: np.ndarray, weights: str | None = None) -> np.ndarray:
        """L2-normalised shared-space embeddings [N, E] of X-rays."""
        return self.predictor.embed_vision(self.params_for(weights), as_float(images))

    def embed_volumes(
        self,
        volumes: np.ndarray,
        weights: str | None = None,
        slice_indices: np.ndarray | None = None,
    ) -> np.ndarray:
        """Embeddings of volumes with attentive slice selection and the joint pass, as trained;
        ``slice_indices`` [N, k]: with these slices instead (k = 0: the volume alone)."""
        params, k = self.params_for(weights), self.config.selection.k
        if slice_indices is not None and np.shape(slice_indices)[1] == 0:
            return self.predictor.embed_vision(params, as_float(volumes), 0)
        if slice_indices is not None:
            return self.predictor.embed_volumes_with_slices(
                params, as_float(volumes), slice_indices
            )
        return self.predictor.embed_vision(params, as_float(volumes), k)

    def select_slices(
        self, volumes: np.ndarray, k: int | None = None, weights: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(indices [N, k] sorted, per-slice scores [N, D]) of Eq. 2's attentive selection."""
        k = k or self.config.selection.k
        return self.predictor.slice_indices_and_scores(
            self.params_for(weights), as_float(volumes), k
        )

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised shared-space embeddings [N, E] of report texts."""
        encoded = tokenize(texts, self.tokenizer, self.config.text.max_length, "text")
        ids, mask = (encoded[f"text_text_{key}"].astype(np.int32) for key in ("ids", "mask"))
        return self.predictor.embed_text(self.student, ids, mask)


def _fresh_vision_params(model: UniMedI, config, seed: int = 0) -> dict:
    """Newly initialised vision-tower params of ``model``'s architecture: the "Random Init"
    baseline of the paper's probe tables."""
    images, volumes, slices, *_ = init_inputs(config)
    touch = lambda vit, x, v, s: (vit(x), vit(v, s))  # both tokenizers, so all params exist
    variables = jax.jit(nn.init(touch, model.vision))(jax.random.key(seed), images, volumes, slices)
    return nn.unbox(variables["params"])


def load(
    path: str | Path,
    batch_size: int = 16,
    random_init: bool = False,
    seed: int = 0,
    vision_weights: str | None = None,
) -> UniMedIInference:
    """Loads the newest readable (or the given) checkpoint of a run for inference on the local
    device; a damaged newest checkpoint is skipped with a logged line. Creates nothing.

    ``vision_weights``: student | teacher, in place of the run's own (its config.json's).

    ``random_init``: replace the vision tower (student and teacher) by fresh weights from
    ``seed``, keeping the checkpoint's architecture, as a baseline for downstream evaluation.
    """
    workdir, step = resolve_run(path)
    config = load_config(workdir)
    config.vision_weights = vision_weights or config.vision_weights
    text = load_text_tower(config, workdir)
    model = build_unimedi(config, text.config, compute_dtype(config.precision.compute_dtype))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    try:
        restored = checkpointer.restore_raw_newest(step)
    finally:
        checkpointer.close()
    if restored is None:
        raise RunNotFoundError(
            f"no checkpoint in {workdir / 'checkpoints'}: the run has not saved one yet. Train "
            "it further (checkpoint_every_steps sets how often it saves)."
        )
    step, state = restored
    params = jax.tree.map(jnp.asarray, state["params"])
    teacher = jax.tree.map(jnp.asarray, state["teacher"])
    if random_init:
        fresh = _fresh_vision_params(model, config, seed)
        params, teacher = {**params, "vision": fresh}, {**teacher, "vision": fresh}
    return UniMedIInference(config, model, params, teacher, text.tokenizer, batch_size, step)
