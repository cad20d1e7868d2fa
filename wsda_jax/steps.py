"""Train steps: pure per-device bodies that `parallel.py` wraps in jit(shard_map).

`adapt_step` is one adaptation step of docs/method.md §4, each part one call into the
module of its concept; `source_only_step` is stage 1 (and the oracle). Both end in
`update_and_metrics` (the guarded SGD update and the step's metrics). Config branches
(weak-label kind, ClassMix, `contrast_on`) are chosen at trace time.

Inside the step every cross-device quantity is reduced over `axis_name`: the loss that
is differentiated is the `pmean` of the per-device loss (its gradient w.r.t. the
replicated parameters comes back already summed by shard_map, see STYLE.md), BatchNorm
statistics are synchronised by the model's `bn_axis_name`, and the pseudo-label
fraction and prototypes are `psum`s of sums and counts.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from wsda_jax import (
    augment,
    config_lib,
    contrastive,
    ema,
    feature_distance,
    losses,
    masking,
    optim,
    prototypes,
    pseudo_labels,
    step_inputs,
)
from wsda_jax.models import deeplab
from wsda_jax.train_state import TrainState


def contrast_on_terms(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The loss terms that only the `contrast_on` program computes (c and i of §4.11):
    the contrastive losses (with config.loss.use_contrast) and, for weak labels, the
    image-level ones."""
    names = contrastive.CONTRAST_TERMS if config.loss.use_contrast else ()
    if config.weak_label != "none":  # Plain UDA has no presence vector to learn from.
        names = (*names, "im_u", "im_proto")
    return names


def contrast_off_metrics(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """The metrics that the program before contrast_start does not compute, as float32 0,
    so that both programs log the same keys: each `contrast_on_terms` term and the anchor
    counts of the contrastive losses."""
    names = list(contrast_on_terms(config))
    if config.loss.use_contrast:
        names += [f"anchors_{name}" for name in contrastive.CONTRAST_TERMS]
    return {name: jnp.zeros((), jnp.float32) for name in names}


def contrast_ramp(step: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """float32 factor of the contrastive terms: 1 (the reference), or with
    config.loss.contrast_ramp_steps = R > 0 a linear ramp (step - contrast_start + 1) / R
    clipped to [0, 1], an option for studying the terms' effect (README results)."""
    ramp_steps = config.loss.contrast_ramp_steps
    if ramp_steps == 0:
        return jnp.float32(1.0)
    progress = (step - config.loss.contrast_start + 1).astype(jnp.float32) / ramp_steps
    return jnp.clip(progress, 0.0, 1.0)


def weighted_terms(
    terms: dict[str, jax.Array],
    loss_config: ml_collections.ConfigDict,
    ramp: jax.Array | float = 1.0,
) -> dict[str, jax.Array]:
    """Each unweighted loss times its config weight, the contrastive terms also times
    `ramp` (`contrast_ramp`). The total loss of §4.11 is the sum of the result."""
    return {
        name: loss_config[name] * (ramp * value if name in contrastive.CONTRAST_TERMS else value)
        for name, value in terms.items()
    }


def target_terms(
    out_u: deeplab.SegmentationOutput,
    inputs: step_inputs.AdaptInputs,
    config: ml_collections.ConfigDict,
    contrast_on: bool,
) -> dict[str, jax.Array]:
    """Section 4.2: `seg_u` (point/coarse) and, with contrast_on, `im_u` (weak labels),
    unweighted."""
    terms = {}
    if config_lib.has_label_map(config.weak_label):
        terms["seg_u"] = losses.cross_entropy(out_u.logits, inputs.weak_label)
    if contrast_on and "im_u" in contrast_on_terms(config):
        terms["im_u"] = losses.image_level_loss(out_u.logits, inputs.presence)
    return terms


def source_terms(
    out_s: deeplab.SegmentationOutput,
    source_label: jax.Array,
    key: jax.Array,
    config: ml_collections.ConfigDict,
    axis_name: str,
) -> dict[str, jax.Array]:
    """Section 4.3: `seg_s` and the boundary loss `edge_s`, unweighted. The boundary loss's
    normalising maximum is per device (the reference's DDP semantics) or over all devices
    with config.loss.boundary_max == 'global'."""
    global_max = config.loss.boundary_max == "global"
    return {
        "seg_s": losses.cross_entropy(out_s.logits, source_label),
        "edge_s": losses.boundary_loss(
            out_s.logits,
            source_label,
            key,
            tau=config.loss.boundary_tau,
            max_axis_name=axis_name if global_max else None,
        ),
    }


def adapt_loss(
    params: Any,
    *,
    state: TrainState,
    inputs: step_inputs.AdaptInputs,
    teacher: pseudo_labels.PseudoLabels,
    target_protos: jax.Array,
    keys: dict[str, jax.Array],
    mic_key: jax.Array,
    model: nn.Module,
    config: ml_collections.ConfigDict,
    axis_name: str,
    contrast_on: bool,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array], Any, jax.Array]]:
    """Sections 4.2, 4.3, 4.7 (source) and 4.8-4.11: the student's part of the step, in
    this order: the student on the target (seg_u, im_u) and on the source (seg_s, edge_s;
    imnet_fd with config.loss.imnet_fd); the source prototypes; with contrast_on, im_proto
    and the contrastive losses; the mixed input and the student on it (seg_mix), with
    config.mic the masked target (`masking`, `mic`); the weighted total.

    Student BatchNorm statistics are chained through the student forward passes (target,
    source, mixed, masked), each a momentum update as in the reference.
    Returns (total loss pmean-ed over devices, (weighted terms, anchor counts, the new
    batch_stats, the new source prototypes)).
    """
    # The student's passes of equal shapes go through one jitted forward, which traces the
    # model once for all of them (a shorter trace; inlined, the same compiled step). It
    # also returns the encoder's output, which the source pass's imnet_fd reads.
    forward = functools.partial(
        jax.jit(feature_distance.train_forward_with_encoding, static_argnums=0), model, params
    )
    dropout = step_inputs.dropout_keys(state, axis_name)
    # (2) Student on target: seg_u, im_u.
    out_u, batch_stats, _ = forward(state.batch_stats, inputs.target_image, dropout["target"])
    terms = target_terms(out_u, inputs, config, contrast_on)
    # (3) Student on source: seg_s, edge_s (and imnet_fd, not in the reference).
    out_s, batch_stats, fd = feature_distance.source_forward(
        model, forward, batch_stats, inputs, state.imnet_encoder, config, dropout["source"]
    )
    terms.update(source_terms(out_s, inputs.source_label, keys["edge"], config, axis_name), **fd)
    # (7, source) Source prototypes from the student's source features.
    source_protos = prototypes.update_source_prototypes(
        state.source_prototypes, out_s.features, inputs.source_label, axis_name=axis_name
    )
    counts = {}
    if contrast_on and "im_proto" in contrast_on_terms(config):
        # (8) Image-level loss of the prototype logits.
        terms["im_proto"] = losses.prototype_image_loss(
            out_u.features, target_protos, inputs.presence
        )
    if contrast_on and config.loss.use_contrast:
        # (9) Contrastive losses.
        contrast, counts = contrastive.contrastive_losses(
            keys,
            out_s,
            out_u,
            inputs.source_label,
            inputs.weak_label,
            teacher.features,
            teacher.masked_lowres,
            teacher.lowres_confidence,
            source_protos,
            target_protos,
            config,
        )
        terms.update(contrast)
    # (10) ClassMix and strong augmentation (no gradient), then the student on the result.
    mixed = augment.mixed_batch(
        keys["mix"],
        inputs.source_image,
        inputs.source_label,
        inputs.target_image,
        teacher.label,
        teacher.weight,
        config.classmix,
    )
    out_m, batch_stats, _ = forward(batch_stats, mixed.image, dropout["mixed"])
    terms["seg_mix"] = losses.cross_entropy(out_m.logits, mixed.label, mixed.weight)
    if config.mic.enabled:  # Masked image consistency, not in the reference.
        masked = masking.masked_batch(
            mic_key, inputs.target_image, teacher.label, teacher.weight, config
        )
        out_k, batch_stats, _ = forward(batch_stats, masked.image, dropout["masked"])
        terms["mic"] = masking.mic_loss(out_k.logits, masked)
    # (11) Weighted total, averaged over devices: the loss that is differentiated.
    weighted = weighted_terms(terms, config.loss, contrast_ramp(state.step, config))
    total = jax.lax.pmean(sum(weighted.values()), axis_name)
    return total, (weighted, counts, batch_stats, source_protos)


def update_and_metrics(
    state: TrainState,
    grads: Any,
    total: jax.Array,
    terms: dict[str, jax.Array],
    *,
    teacher: tuple[Any, Any],
    carried: dict[str, Any],
    extra_metrics: dict[str, jax.Array],
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    axis_name: str,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The common end of both steps: the new `teacher` (this step's (teacher_params,
    teacher_batch_stats), always kept), the guarded update (§4.12) of the parameters and
    of the `carried` state fields (a skipped step leaves them unchanged), and the step's
    metrics from this device's weighted loss `terms` (pmean-ed). Returns (new state,
    float32 scalar metrics identical on every device)."""
    state = state.replace(teacher_params=teacher[0], teacher_batch_stats=teacher[1])
    new_state, grad_norm = optim.guarded_update(state, grads, total, optimizer, carried)
    step_metrics = {name: jax.lax.pmean(value, axis_name) for name, value in terms.items()}
    step_metrics.update(extra_metrics)
    step_metrics.update(
        total=total,
        learning_rate=optim.learning_rate_schedule(config)(state.step),
        grad_norm=grad_norm,
        skipped_steps=new_state.skipped_steps.astype(jnp.float32),
    )
    return new_state, step_metrics


def adapt_step(
    state: TrainState,
    batch: step_inputs.Batch,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    contrast_on: bool,
    axis_name: str = "data",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One adaptation step (docs/method.md §4), per device, in this order: the inputs; (1)
    the teacher EMA; (4)-(6) the teacher's pseudo labels; (7) the target prototypes;
    `adapt_loss` and its gradient: (2)-(3) the student on target and source, (7) the
    source prototypes, (8)-(9) the prototype image loss and the contrastive losses, (10)
    the mixed input and the student on it, (11) the weighted total; (12) the guarded
    update.

    Args:
      state: replicated TrainState.
      batch: this device's share of the train batch (see ARCHITECTURE.md).
      model: DeepLabV2 built with bn_axis_name=axis_name.
      optimizer: `optim.make_optimizer(config)`.
      config: run configuration.
      contrast_on: static; whether the contrastive and image-level losses (c and i of
        §4.11) are computed. The caller picks it on the host, step >= contrast_start
        (`train.make_train_step`: two programs). When off, their metrics read 0
        (`contrast_off_metrics`).
      axis_name: the data-parallel mesh axis.
    Returns:
      (new state, metrics): float32 scalars identical on every device: every weighted loss
      term (pmean over devices; `mic` with config.mic), total, learning_rate (backbone),
      the confident fraction q, anchors_<loss> (sampled anchors per device, averaged),
      grad_norm, skipped_steps.
    """
    keys = step_inputs.adapt_keys(state, axis_name)
    # Inputs: jittered, normalised images, int32 labels, this step's weak labels, presence.
    inputs = step_inputs.adapt_inputs(batch, keys, config)
    # (1) Teacher EMA from the student of the previous step.
    teacher_params, teacher_batch_stats = ema.ema_update(state, config)
    # (4)-(6) Teacher pseudo labels and their weights; independent of the student.
    teacher, teacher_batch_stats = pseudo_labels.teacher_pseudo_labels(
        model,
        teacher_params,
        teacher_batch_stats,
        inputs.target_image,
        inputs.weak_label,
        inputs.presence,
        config,
        axis_name,
    )
    # (7, target) Target prototypes from the teacher.
    target_protos = prototypes.update_target_prototypes(
        state.target_prototypes,
        teacher.features,
        teacher.masked_lowres,
        inputs.weak_label,
        weak_label_kind=config.weak_label,
        axis_name=axis_name,
    )
    # (2), (3), (7, source), (8)-(11): the student's losses and their gradient.
    loss_fn = functools.partial(
        adapt_loss,
        state=state,
        inputs=inputs,
        teacher=teacher,
        target_protos=target_protos,
        keys=keys,
        mic_key=step_inputs.mic_key(state, axis_name),
        model=model,
        config=config,
        axis_name=axis_name,
        contrast_on=contrast_on,
    )
    (total, (terms, counts, batch_stats, source_protos)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    # (12) Guarded update; teacher and prototypes are carried to the next step.
    extra_metrics = {} if contrast_on else contrast_off_metrics(config)
    for name, count in counts.items():
        extra_metrics[f"anchors_{name}"] = jax.lax.pmean(count.astype(jnp.float32), axis_name)
    extra_metrics["pseudo_confident_fraction"] = teacher.q
    return update_and_metrics(
        state,
        grads,
        total,
        terms,
        teacher=(teacher_params, teacher_batch_stats),
        carried={
            "batch_stats": batch_stats,
            "source_prototypes": source_protos,
            "target_prototypes": target_protos,
        },
        extra_metrics=extra_metrics,
        optimizer=optimizer,
        config=config,
        axis_name=axis_name,
    )


def source_only_step(
    state: TrainState,
    batch: step_inputs.Batch,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    axis_name: str = "data",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Stage 1 / oracle: seg_s * CE + edge_s * boundary loss on batch['source'] only.

    The teacher is still EMA-updated, so a stage-2 run initialised from this state has
    both a student and a teacher. With config.loss.source_only_contrast (off in the
    reference) the step also updates the source prototypes and adds intra_src *
    `contrastive.intra_source_loss`, so the projection head starts stage 2 trained.
    """
    key, jitter_key = jax.random.split(step_inputs.step_key(state, axis_name))
    # Inputs: colour-jittered, normalised source images and int32 labels.
    image = step_inputs.input_images(jitter_key, batch["source"]["image"], config)
    label = batch["source"]["label"].astype(jnp.int32)
    teacher = ema.ema_update(state, config)
    with_contrast = config.loss.source_only_contrast
    dropout = step_inputs.dropout_keys(state, axis_name)["source"]

    def loss_fn(params):
        out, batch_stats = deeplab.train_forward(model, params, state.batch_stats, image, dropout)
        terms = source_terms(out, label, key, config, axis_name)
        protos, anchors = state.source_prototypes, {}
        if with_contrast:
            protos = prototypes.update_source_prototypes(
                protos, out.features, label, axis_name=axis_name
            )
            # A key of its own, so the default stage 1 keeps its random stream.
            terms["intra_src"], anchors["intra_src"] = contrastive.intra_source_loss(
                jax.random.fold_in(key, 1), out, label, protos, config
            )
        terms = weighted_terms(terms, config.loss)
        total = jax.lax.pmean(sum(terms.values()), axis_name)
        return total, (terms, batch_stats, protos, anchors)

    (total, (terms, batch_stats, protos, anchors)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    return update_and_metrics(
        state,
        grads,
        total,
        terms,
        teacher=teacher,
        carried={"batch_stats": batch_stats, "source_prototypes": protos},
        extra_metrics={
            f"anchors_{name}": jax.lax.pmean(count.astype(jnp.float32), axis_name)
            for name, count in anchors.items()
        },
        optimizer=optimizer,
        config=config,
        axis_name=axis_name,
    )
