"""Train steps: pure per-device bodies that `parallel.py` wraps in jit(shard_map).

`adapt_step` is one adaptation step of docs/method.md §4, in its numbered order, each
step one call; `source_only_step` is stage 1 (and the oracle). Both end in
`update_and_metrics` (the guarded SGD update and the step's metrics). The teacher's
pseudo labels live in `pseudo_labels.py`, inference (`predict`, `eval_step`) in
`evaluation.py`. Config branches (weak-label kind, ClassMix, contrastive terms) are
chosen at trace time.

Inside the step every cross-device quantity is reduced over `axis_name`: the loss that
is differentiated is the `pmean` of the per-device loss (its gradient w.r.t. the
replicated parameters comes back already summed by shard_map, see STYLE.md), BatchNorm
statistics are synchronised by the model's `bn_axis_name`, and the pseudo-label
fraction and prototypes are `psum`s of sums and counts.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from wsda_jax import (
    augment,
    classes,
    contrastive,
    ema,
    label_ops,
    losses,
    masking,
    optim,
    prototypes,
    pseudo_labels,
)
from wsda_jax.models import deeplab
from wsda_jax.train_state import TrainState

# The terms that are 0 before config.loss.contrast_start: `c` and `i` of §4.11.
GATED_TERMS = (*contrastive.CONTRAST_TERMS, "im_u", "im_proto")
# The adapt step's random streams, split in this order from `step_key`.
ADAPT_KEYS = ("jitter_s", "jitter_t", "edge", "inter", "intra_src", "intra_tgt", "mix")
# Masked image consistency's key is fold_in(step key, MIC_STREAM), not an eighth split,
# so switching it on leaves the other streams (and the reference's runs) unchanged.
MIC_STREAM = 1
Batch = dict[str, Any]


def step_key(state: TrainState, axis_name: str) -> jax.Array:
    """The step's PRNG key: base key folded with the step, then with the device index."""
    key = jax.random.fold_in(state.rng, state.step)
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def mic_key(state: TrainState, axis_name: str) -> jax.Array:
    """This device's key for masked image consistency: `step_key` folded with MIC_STREAM."""
    return jax.random.fold_in(step_key(state, axis_name), MIC_STREAM)


def input_images(key: jax.Array, images: jax.Array, config: ml_collections.ConfigDict):
    """uint8 [B, H, W, 3] crops from the pipeline -> colour-jittered (config.data.jitter,
    docs/method.md §12), ImageNet-normalised float32 [B, H, W, 3]."""
    return augment.normalize(augment.color_jitter(key, images, config.data.jitter))


def target_weak_labels(
    target: Batch, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """The step's weak label map and presence vector from the target batch (§4).

    `target['weak_label']` is the augmented crop of the weak label map: gtCoarse for
    'coarse' and 'image', the points for 'point'. With config.presence == 'crop'
    (faithful default) the presence vector is the set of classes in that crop, as the
    reference computes it every step; with 'image' it is the record's whole-image
    presence (true image-level tags, `target['presence']`). For 'image' the weak label
    map is then all 255: only the presence vector carries information.

    Returns (weak_label int32 [B, H, W], presence float32 [B, C]).
    """
    crop = target["weak_label"].astype(jnp.int32)
    if config.presence == "crop":
        presence = label_ops.presence(crop, config.num_classes)
    else:
        presence = target["presence"].astype(jnp.float32)
    if config.weak_label not in ("point", "coarse"):
        crop = jnp.full_like(crop, classes.IGNORE_LABEL)
    return crop, presence


class AdaptInputs(NamedTuple):
    """The device batch as the adaptation step uses it.

    source_image, target_image: float32 [B, H, W, 3], ImageNet-normalised.
    source_label, weak_label: int32 [B, H, W] (255 = ignore); presence: float32 [B, C].
    """

    source_image: jax.Array
    source_label: jax.Array
    target_image: jax.Array
    weak_label: jax.Array
    presence: jax.Array


def adapt_inputs(
    batch: Batch, keys: dict[str, jax.Array], config: ml_collections.ConfigDict
) -> AdaptInputs:
    """Colour-jittered (keys 'jitter_s', 'jitter_t'), normalised images, int32 labels and
    this step's weak labels and presence."""
    weak_label, presence = target_weak_labels(batch["target"], config)
    return AdaptInputs(
        source_image=input_images(keys["jitter_s"], batch["source"]["image"], config),
        source_label=batch["source"]["label"].astype(jnp.int32),
        target_image=input_images(keys["jitter_t"], batch["target"]["image"], config),
        weak_label=weak_label,
        presence=presence,
    )


def contrast_gate(step: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """c = i of §4.11: float32 1 from step config.loss.contrast_start on, else 0."""
    return (step >= config.loss.contrast_start).astype(jnp.float32)


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
    gate: jax.Array,
    contrast_factor: jax.Array | float = 1.0,
) -> dict[str, jax.Array]:
    """Each unweighted loss times its config weight, the GATED_TERMS times `gate` and the
    contrastive terms also times `contrast_factor` (`contrast_ramp`).

    The total loss of §4.11 is the sum of the result.
    """
    factors = {name: gate for name in GATED_TERMS}
    for name in contrastive.CONTRAST_TERMS:
        factors[name] = gate * contrast_factor
    return {
        name: loss_config[name] * (factors[name] * value if name in factors else value)
        for name, value in terms.items()
    }


def _boundary_loss(logits, labels, key, config, axis_name):
    """The source boundary loss; its normalising maximum is per device (the reference's
    DDP semantics) or over all devices with config.loss.boundary_max == 'global'."""
    global_max = config.loss.boundary_max == "global"
    return losses.boundary_loss(
        logits,
        labels,
        key,
        tau=config.loss.boundary_tau,
        max_axis_name=axis_name if global_max else None,
    )


def target_terms(
    out_u: deeplab.SegmentationOutput,
    inputs: AdaptInputs,
    config: ml_collections.ConfigDict,
    contrast_on: bool,
) -> dict[str, jax.Array]:
    """Section 4.2: `seg_u` (point/coarse) and `im_u` (weak labels), unweighted."""
    terms = {}
    if config.weak_label in ("point", "coarse"):
        terms["seg_u"] = losses.cross_entropy(out_u.logits, inputs.weak_label)
    if config.weak_label != "none":  # Plain UDA has no presence vector to learn from.
        terms["im_u"] = (
            losses.image_level_loss(out_u.logits, inputs.presence)
            if contrast_on
            else jnp.zeros((), jnp.float32)
        )
    return terms


def source_terms(
    out_s: deeplab.SegmentationOutput,
    source_label: jax.Array,
    key: jax.Array,
    config: ml_collections.ConfigDict,
    axis_name: str,
) -> dict[str, jax.Array]:
    """Section 4.3: `seg_s` and the boundary loss `edge_s`, unweighted."""
    return {
        "seg_s": losses.cross_entropy(out_s.logits, source_label),
        "edge_s": _boundary_loss(out_s.logits, source_label, key, config, axis_name),
    }


def source_prototypes(
    previous: jax.Array, features: jax.Array, source_label: jax.Array, axis_name: str
) -> jax.Array:
    """Section 4.7 (source): center = member = the source labels at feature resolution."""
    low = label_ops.resize_nearest(source_label, features.shape[1:3])
    return prototypes.update_prototypes(previous, features, low, low, axis_name=axis_name)


def prototype_image_terms(
    features_u: jax.Array,
    target_protos: jax.Array,
    presence: jax.Array,
    config: ml_collections.ConfigDict,
    contrast_on: bool,
) -> dict[str, jax.Array]:
    """Section 4.8: `im_proto`, the image-level loss of `features_u . protos^T` (weak only)."""
    if config.weak_label == "none":
        return {}
    if not contrast_on:
        return {"im_proto": jnp.zeros((), jnp.float32)}
    proto_logits = jnp.einsum("bhwd,cd->bhwc", features_u, jax.lax.stop_gradient(target_protos))
    return {"im_proto": losses.image_level_loss(proto_logits, presence)}


def adapt_loss(
    params: Any,
    *,
    state: TrainState,
    inputs: AdaptInputs,
    teacher: pseudo_labels.PseudoLabels,
    target_protos: jax.Array,
    mixed: augment.MixedBatch,
    keys: dict[str, jax.Array],
    model: nn.Module,
    config: ml_collections.ConfigDict,
    axis_name: str,
    contrast_on: bool,
    masked: masking.MaskedBatch | None = None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array], Any, jax.Array]]:
    """Sections 4.2, 4.3, 4.7 (source) and 4.8-4.11: the student's part of the step.

    Student BatchNorm statistics are chained through the three student forward passes
    (target, source, mixed), each a momentum update as in the reference, and a fourth
    on the `masked` target batch when given (`masking`, the `mic` term).
    Returns (total loss pmean-ed over devices, (weighted terms, anchor counts, the new
    batch_stats, the new source prototypes)).
    """
    # (2) Student on target: seg_u, im_u.
    out_u, batch_stats = deeplab.train_forward(
        model, params, state.batch_stats, inputs.target_image
    )
    terms = target_terms(out_u, inputs, config, contrast_on)
    # (3) Student on source: seg_s, edge_s.
    out_s, batch_stats = deeplab.train_forward(model, params, batch_stats, inputs.source_image)
    terms.update(source_terms(out_s, inputs.source_label, keys["edge"], config, axis_name))
    # (7, source) Source prototypes from the student's source features.
    source_protos = source_prototypes(
        state.source_prototypes, out_s.features, inputs.source_label, axis_name
    )
    # (8) Image-level loss of the prototype logits.
    terms.update(
        prototype_image_terms(out_u.features, target_protos, inputs.presence, config, contrast_on)
    )
    # (9) Contrastive losses.
    contrast, counts = contrastive.contrastive_terms(
        keys,
        out_s,
        out_u,
        inputs.source_label,
        inputs.weak_label,
        teacher,
        source_protos,
        target_protos,
        config,
        contrast_on,
    )
    terms.update(contrast)
    # (10) Student on the mixed batch.
    out_m, batch_stats = deeplab.train_forward(model, params, batch_stats, mixed.image)
    terms["seg_mix"] = losses.cross_entropy(out_m.logits, mixed.label, mixed.weight)
    if masked is not None:  # Masked image consistency (config.mic), not in the reference.
        out_k, batch_stats = deeplab.train_forward(model, params, batch_stats, masked.image)
        terms["mic"] = masking.mic_loss(out_k.logits, masked)
    # (11) Weighted total, averaged over devices: the loss that is differentiated.
    weighted = weighted_terms(
        terms, config.loss, contrast_gate(state.step, config), contrast_ramp(state.step, config)
    )
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
    """The common end of both steps: the new teacher, the guarded update (§4.12)
    of the parameters and of the `carried` state fields, and the step's metrics.

    Args:
      teacher: this step's (teacher_params, teacher_batch_stats), always kept.
      carried: new values of state fields that a skipped step leaves unchanged.
      terms: the weighted loss terms of this device (pmean-ed into the metrics).
    Returns:
      (new state, float32 scalar metrics identical on every device).
    """
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
    batch: Batch,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    axis_name: str = "data",
    contrast_on: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One adaptation step (docs/method.md §4), per device.

    Args:
      state: replicated TrainState.
      batch: this device's share of the train batch (see ARCHITECTURE.md).
      model: DeepLabV2 built with bn_axis_name=axis_name.
      optimizer: `optim.make_optimizer(config)`.
      config: run configuration.
      axis_name: the data-parallel mesh axis.
      contrast_on: static. False before `config.loss.contrast_start`: the contrastive and
        image-level losses are then not computed at all (their metrics read 0), instead
        of being computed and multiplied by 0. The caller picks it from the host's step
        count (`train.make_train_step`); True keeps the in-step factor c = [step >=
        contrast_start], so it is never wrong, only slower, before contrast_start.
    Returns:
      (new state, metrics): float32 scalars identical on every device: every weighted loss
      term (pmean over devices; `mic` with config.mic), total, learning_rate (backbone),
      the confident fraction q, anchors_<loss> (sampled anchors per device, averaged),
      grad_norm, skipped_steps.
    """
    keys = dict(
        zip(ADAPT_KEYS, jax.random.split(step_key(state, axis_name), len(ADAPT_KEYS)), strict=True)
    )
    # Inputs: colour-jittered, normalised images, int32 labels, this step's weak labels
    # and presence.
    inputs = adapt_inputs(batch, keys, config)
    # (1) Teacher EMA from the student of the previous step.
    teacher_params, teacher_batch_stats = ema.ema_update(state, config)
    # (4)-(6) Teacher pseudo labels and their weights; independent of the student.
    teacher, teacher_batch_stats = pseudo_labels.teacher_pseudo_labels(
        model,
        teacher_params,
        teacher_batch_stats,
        inputs.target_image,
        {"weak_label": inputs.weak_label, "presence": inputs.presence},
        config,
        axis_name,
    )
    # (7, target) Target prototypes from the teacher.
    target_protos = pseudo_labels.update_target_prototypes(
        state.target_prototypes, teacher, inputs.weak_label, config, axis_name
    )
    # (10, input) ClassMix and strong augmentation: independent of the student.
    mixed = pseudo_labels.mixed_batch(
        keys["mix"], inputs.source_image, inputs.source_label, inputs.target_image, teacher, config
    )
    # With config.mic: the masked target input (beyond the reference).
    masked = None
    if config.mic.enabled:
        masked = masking.masked_batch(
            mic_key(state, axis_name),
            inputs.target_image,
            teacher["label"],
            teacher["weight"],
            config,
        )
    # (2), (3), (7, source), (8)-(11): the student's losses and their gradient.
    loss_fn = functools.partial(
        adapt_loss,
        state=state,
        inputs=inputs,
        teacher=teacher,
        target_protos=target_protos,
        mixed=mixed,
        keys=keys,
        model=model,
        config=config,
        axis_name=axis_name,
        contrast_on=contrast_on,
        masked=masked,
    )
    (total, (terms, counts, batch_stats, source_protos)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    # (12) Guarded update; teacher and prototypes are carried to the next step.
    anchors = {
        f"anchors_{name}": jax.lax.pmean(count.astype(jnp.float32), axis_name)
        for name, count in counts.items()
    }
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
        extra_metrics={**anchors, "pseudo_confident_fraction": teacher["q"]},
        optimizer=optimizer,
        config=config,
        axis_name=axis_name,
    )


def source_only_step(
    state: TrainState,
    batch: Batch,
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
    key, jitter_key = jax.random.split(step_key(state, axis_name))
    # Inputs: colour-jittered, normalised source images and int32 labels.
    image = input_images(jitter_key, batch["source"]["image"], config)
    label = batch["source"]["label"].astype(jnp.int32)
    teacher = ema.ema_update(state, config)
    with_contrast = config.loss.source_only_contrast

    def loss_fn(params):
        out, batch_stats = deeplab.train_forward(model, params, state.batch_stats, image)
        terms = source_terms(out, label, key, config, axis_name)
        protos, anchors = state.source_prototypes, {}
        if with_contrast:
            protos = source_prototypes(protos, out.features, label, axis_name)
            # A key of its own, so the default stage 1 keeps its random stream.
            terms["intra_src"], anchors["intra_src"] = contrastive.intra_source_loss(
                jax.random.fold_in(key, 1), out, label, protos, config
            )
        terms = weighted_terms(terms, config.loss, jnp.float32(1))
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
