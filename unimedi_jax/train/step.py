"""The one compiled UniMedI train step (DESIGN "One train step"; paper sections 3.2-3.4).

teacher pass for slice selection -> teacher pass on the full 2D and 3D+slice sequences ->
attention-guided masks -> student pass on the masked sequences -> text pass -> losses -> AdamW
(its schedule at ``state.step``) -> logit-scale clamp -> EMA teacher -> centers; with
``train.on_nonfinite=skip`` a step whose loss or gradients are not finite leaves the learned
state as it was (and counts it). A batch holds X-rays, volumes or both, each with its report
tokens: ``image [B2, H, W]``, ``image_text_ids``/``image_text_mask``
[B2, L]; ``volume [B3, D, H, W]``, ``volume_text_ids``/``volume_text_mask`` [B3, L]. Which of
the two is present is static.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from unimedi_jax.method import losses, selection
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.models.vit import EncoderOutput, token_grid
from unimedi_jax.train.state import TrainState, teacher_subtree

MODALITIES = ("image", "volume")
PCL_TOKENS = ("masked", "all")  # loss.pcl_tokens: the patch positions L_pcl averages over


class StepSchedules(NamedTuple):
    """Step-indexed schedules the step evaluates on device (no host round trip)."""

    learning_rate: optax.Schedule
    teacher_temperature: Callable[[jax.Array], jax.Array]
    teacher_momentum: Callable[[jax.Array], jax.Array]


def make_schedules(config, learning_rate: optax.Schedule, total_steps: int, warmup_steps: int):
    """Teacher temperature warm-up and EMA momentum schedules from the config."""
    loss_cfg = config.loss
    temp_warmup = loss_cfg.warmup_teacher_temp_steps
    temp_warmup = warmup_steps if temp_warmup < 0 else temp_warmup
    return StepSchedules(
        learning_rate=learning_rate,
        teacher_temperature=lambda step: losses.teacher_temperature(
            step, temp_warmup, loss_cfg.warmup_teacher_temp, loss_cfg.teacher_temp
        ),
        teacher_momentum=lambda step: losses.teacher_momentum(
            step, total_steps, config.train.teacher_momentum
        ),
    )


def present_modalities(batch: dict) -> tuple[str, ...]:
    """The modalities a batch carries ('image', 'volume' or both)."""
    found = tuple(m for m in MODALITIES if m in batch)
    if not found:
        raise ValueError(f"a batch needs 'image' or 'volume' arrays; got keys {sorted(batch)}")
    return found


def make_train_step(
    model: UniMedI, tx: optax.GradientTransformation, schedules: StepSchedules, config
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds the pure step function; the caller jits it with shardings and donation."""
    k = config.selection.k
    patch_3d = tuple(config.model.patch_3d)
    per_part = config.masking.per_part
    self_distill = config.loss.self_distill
    skip_nonfinite = config.train.on_nonfinite == "skip"
    loss_cfg = config.loss
    max_logit_scale = loss_cfg.max_logit_scale

    def vision(params, x, slices=None, mask=None) -> EncoderOutput:
        return model.apply({"params": params}, x, slices, mask, method=UniMedI.encode_vision)

    def dino(params, tokens):
        return model.apply({"params": params}, tokens, method=UniMedI.dino)

    def grid_3d(volumes) -> tuple[int, int, int]:
        return token_grid(volumes.shape[1:], patch_3d)

    def select(teacher, volumes, rng):
        """Teacher's Eq. 1 over the volume's own tokens -> Eq. 2 scores -> k slices."""
        attention = vision(teacher, volumes).cls_attention
        mode = config.selection.mode
        _, slices = selection.select_slices(attention, volumes, grid_3d(volumes), k, mode, rng)
        return slices

    def mask_parts(m, volumes, num_tokens):
        """``masking.per_part``: a volume's 3D tokens and its slice tokens are each masked at
        the ratio (None: one top-k over the sequence)."""
        if not per_part or m != "volume":
            return None
        num_3d = math.prod(grid_3d(volumes))
        return (num_3d, num_tokens - num_3d)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        modalities = present_modalities(batch)
        rng, dropout_rng, select_rng, mask_rng = jax.random.split(
            jax.random.wrap_key_data(state.rng), 4
        )
        teacher = state.teacher
        inputs = {m: (batch[m],) for m in modalities}
        if "volume" in inputs:
            slices = jax.lax.stop_gradient(select(teacher, batch["volume"], select_rng))
            inputs["volume"] = (batch["volume"], slices)

        masks, teacher_logits = {}, {}
        if self_distill:
            mask_rngs = dict(zip(MODALITIES, jax.random.split(mask_rng), strict=True))
            for m in modalities:
                out = vision(teacher, *inputs[m])
                teacher_logits[m] = jax.lax.stop_gradient(dino(teacher, out.tokens))
                masks[m] = selection.token_mask(
                    jax.lax.stop_gradient(out.cls_attention),
                    config.masking.ratio,
                    config.masking.mode,
                    mask_rngs[m],
                    mask_parts(m, batch[m], out.cls_attention.shape[1]),
                )
        text_ids = jnp.concatenate([batch[f"{m}_text_ids"] for m in modalities])
        text_mask = jnp.concatenate([batch[f"{m}_text_mask"] for m in modalities])
        teacher_temp = schedules.teacher_temperature(state.step)

        def loss_fn(params):
            student = {m: vision(params, *inputs[m], mask=masks.get(m)) for m in modalities}
            image_emb = model.apply(
                {"params": params},
                jnp.concatenate([student[m].tokens[:, 0] for m in modalities]),
                method=UniMedI.project_vision,
            )
            text_emb = model.apply(
                {"params": params},
                text_ids,
                text_mask,
                deterministic=False,
                method=UniMedI.embed_text,
                rngs={"dropout": dropout_rng},
            )
            logit_scale = params["logit_scale"]["value"]
            groups = None
            if loss_cfg.get("contrast", "joint") == "per_modality":
                groups = tuple(batch[m].shape[0] for m in modalities)
            loss_vl, clip_metrics = losses.grouped_clip_loss(
                image_emb, text_emb, logit_scale, max_logit_scale, groups
            )
            terms = {"loss_vl": loss_vl, **clip_metrics}
            total = loss_cfg.w_vl * loss_vl
            if self_distill:
                student_logits = {m: dino(params, student[m].tokens) for m in modalities}
                terms.update(
                    distillation_losses(
                        student_logits, teacher_logits, masks, state, teacher_temp, loss_cfg
                    )
                )
                total += loss_cfg.w_icl * terms["loss_icl"] + loss_cfg.w_pcl * terms["loss_pcl"]
            return total, terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, step=state.step)
        params = optax.apply_updates(state.params, updates)
        logit_scale = losses.cap_logit_scale(params["logit_scale"]["value"], max_logit_scale)
        params = {**params, "logit_scale": {"value": logit_scale}}
        momentum = schedules.teacher_momentum(state.step)
        new_teacher = losses.ema_update(teacher, teacher_subtree(params), momentum)
        center_cls, center_patch = state.center_cls, state.center_patch
        if self_distill:
            center_cls, center_patch = updated_centers(
                teacher_logits, center_cls, center_patch, loss_cfg.center_momentum
            )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            teacher=new_teacher,
            opt_state=opt_state,
            center_cls=center_cls,
            center_patch=center_patch,
            rng=jax.random.key_data(rng),
        )
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_state = keep_finite_update(finite, new_state, state)
        metrics = {
            "loss": loss,
            **terms,
            "learning_rate": schedules.learning_rate(state.step),
            "grad_norm": grad_norm,
            "teacher_momentum": momentum,
            "teacher_temperature": teacher_temp,
            "nonfinite_skips": new_state.nonfinite_skips,
        }
        return new_state, metrics

    return step_fn


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


def distillation_losses(student_logits, teacher_logits, masks, state, teacher_temp, loss_cfg):
    """L_icl on [CLS] over all samples; L_pcl on the masked patches (``loss.pcl_tokens=masked``,
    iBOT) or on all of them (``all``: the paper's "all local patch tokens"), averaged over all
    samples."""
    modalities = tuple(student_logits)
    on_all = loss_cfg.pcl_tokens == "all"
    loss_icl = losses.dino_cls_loss(
        jnp.concatenate([student_logits[m][:, 0] for m in modalities]),
        jnp.concatenate([teacher_logits[m][:, 0] for m in modalities]),
        state.center_cls,
        teacher_temp,
        loss_cfg.student_temp,
    )
    sizes = {m: student_logits[m].shape[0] for m in modalities}
    loss_pcl = sum(
        sizes[m]
        * losses.ibot_patch_loss(
            student_logits[m][:, 1:],
            teacher_logits[m][:, 1:],
            jnp.ones_like(masks[m]) if on_all else masks[m],
            state.center_patch,
            teacher_temp,
            loss_cfg.student_temp,
        )
        for m in modalities
    ) / sum(sizes.values())
    return {"loss_icl": loss_icl, "loss_pcl": loss_pcl}


def updated_centers(teacher_logits, center_cls, center_patch, momentum):
    """EMA of the teacher's mean [CLS] logits and mean patch logits over the global batch."""
    modalities = tuple(teacher_logits)
    center_cls = losses.update_center(
        center_cls, jnp.concatenate([teacher_logits[m][:, 0] for m in modalities]), momentum
    )
    # Patch sequences differ in length per modality: average per modality, weight by count.
    patch_means = jnp.stack([teacher_logits[m][:, 1:].mean(axis=(0, 1)) for m in modalities])
    counts = jnp.asarray(
        [teacher_logits[m][:, 1:].shape[0] * teacher_logits[m][:, 1:].shape[1] for m in modalities],
        jnp.float32,
    )
    center_patch = losses.update_center(center_patch, patch_means, momentum, weights=counts)
    return center_cls, center_patch
