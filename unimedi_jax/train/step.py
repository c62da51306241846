"""The one compiled UniMedI train step, in the order of the paper's section 3 (DESIGN "One train
step").

``PretrainStep.__call__`` reads top to bottom: ``select_slices`` (3.2: the teacher's Eq. 1
attention over a volume's own tokens -> Eq. 2 slice scores -> k slices) -> ``teacher_targets``
(3.4: the teacher on the full 2D and 3D+slice sequences -> DINO targets, and its [CLS] attention
-> the student's attention-guided masks) -> ``student_losses`` (3.3-3.4: the student on the
masked sequences, the text tower on the reports -> L_vl, L_icl, L_pcl) -> ``apply_update``
(AdamW at ``state.step``, logit-scale clamp, EMA teacher, centres; with
``train.on_nonfinite=skip`` a step whose loss or gradients are not finite leaves the learned
state as it was, and counts it). A batch holds X-rays, volumes or both, each with its report
tokens: ``image [B2, H, W]``, ``image_text_ids``/``image_text_mask`` [B2, L]; ``volume
[B3, D, H, W]``, ``volume_text_ids``/``volume_text_mask`` [B3, L]. Which of the two is present
is static.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unimedi_jax.method import losses, selection
from unimedi_jax.method.teacher import (
    ema_update,
    teacher_momentum,
    teacher_temperature,
    update_centers,
)
from unimedi_jax.models.unimedi import MODALITIES, UniMedI
from unimedi_jax.models.vit import EncoderOutput, token_grid
from unimedi_jax.train.state import TrainState, teacher_subtree

# modality -> the vision tower's inputs: (images,) or (volumes, selected slices [B, k, h, w]).
Sequences = dict[str, tuple[jax.Array, ...]]


class StepSchedules(NamedTuple):
    """Step-indexed schedules the step evaluates on device (no host round trip)."""

    learning_rate: optax.Schedule
    teacher_temperature: Callable[[jax.Array], jax.Array]
    teacher_momentum: Callable[[jax.Array], jax.Array]
    masking: Callable[[jax.Array], jax.Array]  # step -> whether the student's tokens are masked


def make_schedules(
    config: ml_collections.ConfigDict,
    learning_rate: optax.Schedule,
    total_steps: int,
    warmup_steps: int,
) -> StepSchedules:
    """Teacher temperature warm-up, EMA momentum and masking schedules from the config.

    ``masking.unmasked_tuning_fraction``: the last steps show the student every token (FLIP's
    unmasked tuning), so that the embeddings trained on masked sequences also fit the full
    sequences that evaluation and inference encode."""
    loss_cfg = config.loss
    unmask_from = total_steps - round(config.masking.unmasked_tuning_fraction * total_steps)
    temp_warmup = loss_cfg.warmup_teacher_temp_steps
    temp_warmup = warmup_steps if temp_warmup < 0 else temp_warmup
    return StepSchedules(
        learning_rate=learning_rate,
        teacher_temperature=lambda step: teacher_temperature(
            step, temp_warmup, loss_cfg.warmup_teacher_temp, loss_cfg.teacher_temp
        ),
        teacher_momentum=lambda step: teacher_momentum(
            step, total_steps, config.train.teacher_momentum
        ),
        masking=lambda step: step < unmask_from,
    )


def present_modalities(batch: dict) -> tuple[str, ...]:
    """The modalities a batch carries ('image', 'volume' or both)."""
    found = tuple(m for m in MODALITIES if m in batch)
    if not found:
        raise ValueError(f"a batch needs 'image' or 'volume' arrays; got keys {sorted(batch)}")
    return found


class Reports(NamedTuple):
    """The reports of every modality's samples, in the order of the modalities: [B2 + B3, L]."""

    ids: jax.Array
    mask: jax.Array


class TeacherTargets(NamedTuple):
    """What the teacher gives the student (empty dicts with ``loss.self_distill=False``)."""

    dino_logits: dict[str, jax.Array]  # modality -> DINO logits of the full sequence [B, 1+N, K]
    student_masks: dict[str, jax.Array]  # modality -> [B, N], True where the student sees [MASK]
    # modality -> [B, M]: the patch positions L_pcl reads (``loss.pcl_tokens=masked``: the M
    # masked ones), the only ones the student's DINO head runs on; absent: all N.
    pcl_positions: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainStep:
    """The pure pre-training step; the caller jits it with shardings and donation."""

    model: UniMedI
    tx: optax.GradientTransformation
    schedules: StepSchedules
    config: ml_collections.ConfigDict

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        modalities = present_modalities(batch)
        rng, dropout_rng, select_rng, mask_rng = jax.random.split(
            jax.random.wrap_key_data(state.rng), 4
        )
        sequences: Sequences = {m: (batch[m],) for m in modalities}
        if "volume" in sequences:
            slices = self.select_slices(
                state.teacher, batch["volume"], select_rng, batch.get("lesion_slices")
            )
            sequences["volume"] = (batch["volume"], slices)
        targets = self.teacher_targets(
            state.teacher, sequences, mask_rng, self.schedules.masking(state.step)
        )
        reports = Reports(
            jnp.concatenate([batch[f"{m}_text_ids"] for m in modalities]),
            jnp.concatenate([batch[f"{m}_text_mask"] for m in modalities]),
        )
        teacher_temp = self.schedules.teacher_temperature(state.step)

        def loss_of(params):
            return self.student_losses(
                params, sequences, reports, targets, state, teacher_temp, dropout_rng
            )

        (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        new_state, update_metrics = self.apply_update(state, loss, grads, targets, rng)
        metrics = {
            "loss": loss,
            **terms,
            "learning_rate": self.schedules.learning_rate(state.step),
            **update_metrics,
            "teacher_temperature": teacher_temp,
            "nonfinite_skips": new_state.nonfinite_skips,
        }
        return new_state, metrics

    def select_slices(
        self,
        teacher: dict,
        volumes: jax.Array,
        rng: jax.Array,
        lesion_slices: jax.Array | None = None,
    ) -> jax.Array:
        """Sec. 3.2: the teacher's Eq. 1 over each volume's own 3D tokens -> Eq. 2 slice scores
        -> the k selected slices' pixels [B3, k, H, W] (``selection.mode=random``: any k;
        ``oracle``: k inside the batch's ground-truth ``lesion_slices``)."""
        attention = self._encode(teacher, volumes).cls_attention
        cfg = self.config.selection
        _, slices = selection.select_slices(
            attention, volumes, self._grid_3d(volumes), cfg.k, cfg.mode, rng, lesion_slices
        )
        return jax.lax.stop_gradient(slices)

    def teacher_targets(
        self, teacher: dict, sequences: Sequences, rng: jax.Array, masking: jax.Array
    ) -> TeacherTargets:
        """Sec. 3.4: the teacher on the full sequences -> its DINO logits (the targets), and its
        [CLS] attention -> the tokens the student sees masked (``masking_of`` the modality;
        none where ``masking`` is False) and, with ``loss.pcl_tokens=masked``, their positions."""
        if not self.config.loss.self_distill:
            return TeacherTargets({}, {}, {})
        mask_rngs = dict(zip(MODALITIES, jax.random.split(rng), strict=True))
        logits, masks, positions = {}, {}, {}
        for m, inputs in sequences.items():
            out = self._encode(teacher, *inputs)
            logits[m] = jax.lax.stop_gradient(self._dino(teacher, out.tokens))
            num_tokens = out.cls_attention.shape[1]
            parts = self._mask_parts(m, inputs[0], num_tokens)
            ratio, mode = masking_of(self.config.masking, m)
            masks[m] = (
                selection.token_mask(
                    jax.lax.stop_gradient(out.cls_attention), ratio, mode, mask_rngs[m], parts
                )
                & masking
            )
            if self.config.loss.pcl_tokens == "masked":
                count = selection.num_masked(num_tokens, ratio, parts)
                positions[m] = selection.masked_positions(masks[m], count)
        return TeacherTargets(logits, masks, positions)

    def student_losses(
        self,
        params: dict,
        sequences: Sequences,
        reports: Reports,
        targets: TeacherTargets,
        state: TrainState,
        teacher_temp: jax.Array,
        dropout_rng: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Sec. 3.3-3.4: the student on the masked sequences and the text tower on the reports
        -> (w_vl L_vl + w_icl L_icl + w_pcl L_pcl, each term and CLIP's accuracies)."""
        loss_cfg = self.config.loss
        modalities = tuple(sequences)
        student = {
            m: self._encode(params, *sequences[m], mask=targets.student_masks.get(m))
            for m in modalities
        }
        image_emb = self.model.apply(
            {"params": params},
            jnp.concatenate([student[m].tokens[:, 0] for m in modalities]),
            method=UniMedI.project_vision,
        )
        text_emb = self.model.apply(
            {"params": params},
            reports.ids,
            reports.mask,
            deterministic=False,
            method=UniMedI.embed_text,
            rngs={"dropout": dropout_rng},
        )
        groups = None
        if loss_cfg.contrast == "per_modality":
            groups = tuple(sequences[m][0].shape[0] for m in modalities)
        loss_vl, clip_metrics = losses.grouped_clip_loss(
            image_emb, text_emb, params["logit_scale"]["value"], loss_cfg.max_logit_scale, groups
        )
        terms = {"loss_vl": loss_vl, **clip_metrics}
        total = loss_cfg.w_vl * loss_vl
        if loss_cfg.self_distill:
            student_logits = {
                m: self._dino(params, cls_and_positions(student[m].tokens, targets, m))
                for m in modalities
            }
            terms.update(
                distillation_losses(student_logits, targets, state, teacher_temp, loss_cfg)
            )
            total += loss_cfg.w_icl * terms["loss_icl"] + loss_cfg.w_pcl * terms["loss_pcl"]
        return total, terms

    def apply_update(
        self,
        state: TrainState,
        loss: jax.Array,
        grads: dict,
        targets: TeacherTargets,
        rng: jax.Array,
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """AdamW at ``state.step`` -> logit-scale clamp -> EMA teacher -> centres -> the
        non-finite policy; returns the new state and the update's metrics."""
        loss_cfg = self.config.loss
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, step=state.step)
        params = optax.apply_updates(state.params, updates)
        logit_scale = losses.cap_logit_scale(
            params["logit_scale"]["value"], loss_cfg.max_logit_scale
        )
        params = {**params, "logit_scale": {"value": logit_scale}}
        momentum = self.schedules.teacher_momentum(state.step)
        teacher = ema_update(state.teacher, teacher_subtree(params), momentum)
        center_cls, center_patch = state.center_cls, state.center_patch
        if loss_cfg.self_distill:
            center_cls, center_patch = update_centers(
                targets.dino_logits, center_cls, center_patch, loss_cfg.center_momentum
            )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            teacher=teacher,
            opt_state=opt_state,
            center_cls=center_cls,
            center_patch=center_patch,
            rng=jax.random.key_data(rng),
        )
        if self.config.train.on_nonfinite == "skip":
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_state = keep_finite_update(finite, new_state, state)
        return new_state, {"grad_norm": grad_norm, "teacher_momentum": momentum}

    def _encode(
        self,
        params: dict,
        x: jax.Array,
        slices: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> EncoderOutput:
        return self.model.apply({"params": params}, x, slices, mask, method=UniMedI.encode_vision)

    def _dino(self, params: dict, tokens: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, tokens, method=UniMedI.dino)

    def _grid_3d(self, volumes: jax.Array) -> tuple[int, ...]:
        return token_grid(volumes.shape[1:], tuple(self.config.model.patch_3d))

    def _mask_parts(self, modality: str, x: jax.Array, num_tokens: int) -> tuple[int, int] | None:
        """``masking.per_part``: a volume's 3D tokens and its slice tokens are each masked at
        the ratio (None: one top-k over the sequence)."""
        if not self.config.masking.per_part or modality != "volume":
            return None
        num_3d = math.prod(self._grid_3d(x))
        return (num_3d, num_tokens - num_3d)


def masking_of(masking: ml_collections.ConfigDict, modality: str) -> tuple[float, str]:
    """The masking ratio and mode of ``modality``: ``masking.<modality>_ratio`` / ``_mode``
    where set (a ratio from 0, a mode not empty), else ``masking.ratio`` / ``.mode``."""
    ratio, mode = masking[f"{modality}_ratio"], masking[f"{modality}_mode"]
    return (masking.ratio if ratio < 0 else ratio), (mode or masking.mode)


def make_train_step(
    model: UniMedI,
    tx: optax.GradientTransformation,
    schedules: StepSchedules,
    config: ml_collections.ConfigDict,
) -> PretrainStep:
    """The pure step function; the caller jits it with shardings and donation."""
    return PretrainStep(model, tx, schedules, config)


def keep_finite_update(finite: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """``new`` if the step was finite; else ``old``'s params, teacher, optimizer state and
    centers, with the skip counted. Step and rng advance either way, so the schedules and the
    data stay tied to the step number."""
    learned = ("params", "teacher", "opt_state", "center_cls", "center_patch")
    kept = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o),
        {name: getattr(new, name) for name in learned},
        {name: getattr(old, name) for name in learned},
    )
    skips = old.nonfinite_skips + jnp.where(finite, 0, 1).astype(jnp.int32)
    return new.replace(**kept, nonfinite_skips=skips)


def at_positions(x: jax.Array, positions: jax.Array | None) -> jax.Array:
    """x [B, N, ...] at each sample's positions [B, M] (None: all N)."""
    return x if positions is None else jax.vmap(lambda row, i: row[i])(x, positions)


def cls_and_positions(tokens: jax.Array, targets: TeacherTargets, modality: str) -> jax.Array:
    """A sequence's [CLS] and the patch tokens L_pcl reads: [B, 1 + M, D]."""
    positions = targets.pcl_positions.get(modality)
    return jnp.concatenate([tokens[:, :1], at_positions(tokens[:, 1:], positions)], axis=1)


def distillation_losses(
    student_logits: dict[str, jax.Array],
    targets: TeacherTargets,
    state: TrainState,
    teacher_temp: jax.Array,
    loss_cfg: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
    """L_icl on [CLS] over all samples; L_pcl on the masked patches (``loss.pcl_tokens=masked``,
    iBOT) or on all of them (``all``: the paper's "all local patch tokens"), averaged over the
    samples of the modalities in ``loss.pcl_modalities`` (0 when the batch holds none).
    ``student_logits``: [B, 1 + M, K] of [CLS] and the positions ``targets.pcl_positions``
    names (all N where it names none)."""
    modalities = tuple(student_logits)
    teacher_logits, masks = targets.dino_logits, targets.student_masks
    on_all = loss_cfg.pcl_tokens == "all"
    loss_icl = losses.dino_cls_loss(
        jnp.concatenate([student_logits[m][:, 0] for m in modalities]),
        jnp.concatenate([teacher_logits[m][:, 0] for m in modalities]),
        state.center_cls,
        teacher_temp,
        loss_cfg.student_temp,
    )
    sizes = {m: student_logits[m].shape[0] for m in modalities if m in loss_cfg.pcl_modalities}
    if not sizes:
        return {"loss_icl": loss_icl, "loss_pcl": jnp.zeros((), loss_icl.dtype)}
    loss_pcl = sum(
        sizes[m]
        * losses.ibot_patch_loss(
            student_logits[m][:, 1:],
            at_positions(teacher_logits[m][:, 1:], targets.pcl_positions.get(m)),
            at_positions(
                jnp.ones_like(masks[m]) if on_all else masks[m], targets.pcl_positions.get(m)
            ),
            state.center_patch,
            teacher_temp,
            loss_cfg.student_temp,
        )
        for m in sizes
    ) / sum(sizes.values())
    return {"loss_icl": loss_icl, "loss_pcl": loss_pcl}
