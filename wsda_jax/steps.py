"""Train and eval steps: pure per-device bodies that `parallel.py` wraps in jit(shard_map).

`adapt_step` is one adaptation step of METHOD.md section 4, in its order;
`source_only_step` is stage 1 (and the oracle); `eval_step` returns a confusion matrix.
Config branches (weak-label kind, ClassMix, contrastive terms) are chosen at trace time.

Inside the step every cross-device quantity is reduced over `axis_name`: the loss that
is differentiated is the `pmean` of the per-device loss (its gradient w.r.t. the
replicated parameters comes back already summed by shard_map, see STYLE.md), BatchNorm
statistics are synchronised by the model's `bn_axis_name`, and the pseudo-label
fraction and prototypes are `psum`s of sums and counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from wsda_jax import augment, label_ops, losses, metrics, optim, prototypes
from wsda_jax.models import deeplab
from wsda_jax.train_state import TrainState

IGNORE_LABEL = 255
CONTRAST_TERMS = ("inter", "intra_src", "intra_tgt")
Batch = dict[str, Any]


# The adapt step's random streams, split in this order from `step_key`.
ADAPT_KEY_NAMES = ("jitter_s", "jitter_t", "edge", "inter", "intra_src", "intra_tgt", "mix")


def step_key(state: TrainState, axis_name: str) -> jax.Array:
    """The step's PRNG key: base key folded with the step, then with the device index."""
    key = jax.random.fold_in(state.rng, state.step)
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def input_images(key: jax.Array, images: jax.Array, config: ml_collections.ConfigDict):
    """uint8 [B, H, W, 3] crops from the pipeline -> colour-jittered (config.data.jitter,
    METHOD.md section 12), ImageNet-normalised float32 [B, H, W, 3]."""
    return augment.normalize(augment.color_jitter(key, images, config.data.jitter))


def ema_decay(step: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """Teacher EMA factor a: config.ema.decay, or min(1 - 1/(step+1), decay) with the ramp."""
    decay = jnp.float32(config.ema.decay)
    if config.ema.ramp:
        decay = jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), decay)
    return decay


def ema_update(state: TrainState, config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """Teacher <- a * teacher + (1 - a) * student, for parameters AND BatchNorm statistics."""
    step_size = 1.0 - ema_decay(state.step, config)
    params = optax.incremental_update(state.params, state.teacher_params, step_size)
    batch_stats = optax.incremental_update(state.batch_stats, state.teacher_batch_stats, step_size)
    return params, batch_stats


def _forward(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array):
    """Train-mode forward; returns (SegmentationOutput, updated batch_stats)."""
    out, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    return out, updates["batch_stats"]


def _prediction(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., C] logits -> (int32 argmax [...], float32 max softmax [...]), no gradient."""
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)


def pseudo_label_weight(
    confidence: jax.Array, config: ml_collections.ConfigDict, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
    """ClassMix pixel weight of the pseudo labels (METHOD.md section 4.6).

    q = fraction of all target pixels (global batch) with confidence >= threshold; the
    weight is q on those pixels and 0 elsewhere, and 0 on the top `ignore_top` and bottom
    `ignore_bottom` rows.

    Args:
      confidence: float32 [B, H, W], full-resolution teacher confidence.
    Returns:
      (weight float32 [B, H, W], q float32 []).
    """
    confident = confidence >= config.pseudo.threshold
    count = jnp.sum(confident, dtype=jnp.float32)
    total = jnp.float32(confidence.size)
    if axis_name is not None:
        count, total = jax.lax.psum((count, total), axis_name)
    q = count / total
    height = confidence.shape[1]
    rows = jnp.arange(height)
    keep_rows = (rows >= config.pseudo.ignore_top) & (rows < height - config.pseudo.ignore_bottom)
    weight = jnp.where(confident & keep_rows[None, :, None], q, 0.0)
    return weight.astype(jnp.float32), q


def teacher_pseudo_labels(
    model: nn.Module,
    teacher_params: Any,
    teacher_batch_stats: Any,
    target_image: jax.Array,
    target: Batch,
    config: ml_collections.ConfigDict,
    axis_name: str | None,
) -> tuple[dict[str, jax.Array], Any]:
    """Teacher on the target batch, then `pseudo_labels` (sections 4.4-4.6).

    The teacher runs with BatchNorm in training mode (target batch statistics), as the
    reference, whose forward also updates the teacher's running statistics; the next
    step's EMA then blends them with the student's. Returns (pseudo labels, the teacher's
    batch_stats after this forward: updated by it when config.ema.teacher_bn_update, else
    unchanged). Nothing here has a gradient.
    """
    out, updated = _forward(model, teacher_params, teacher_batch_stats, target_image)
    batch_stats = updated if config.ema.teacher_bn_update else teacher_batch_stats
    pseudo = pseudo_labels(jax.lax.stop_gradient(out), target, config, axis_name)
    return pseudo, jax.lax.stop_gradient(batch_stats)


def target_weak_labels(
    target: Batch, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """The step's weak label map and presence vector from the target batch (section 4).

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
        crop = jnp.full_like(crop, IGNORE_LABEL)
    return crop, presence


def pseudo_labels(
    out: Any, target: Batch, config: ml_collections.ConfigDict, axis_name: str | None
) -> dict[str, jax.Array]:
    """Pseudo labels, ClassMix weights and prototype labels from the teacher's outputs.

    Args:
      out: the teacher's SegmentationOutput on the target batch.
      target: the target batch ('weak_label' int32 [B, H, W], 'presence' float32 [B, C]).
    Returns a dict:
      features: [B, h, w, D] teacher features.
      label: int32 [B, H, W] full-res pseudo label, weak label written over it (point/coarse).
      weight: float32 [B, H, W] ClassMix pixel weight; q: [] confident fraction.
      masked_lowres: int32 [B, h, w] low-res pseudo label, 255 where confidence <
        proto_threshold (and, with filter_by_presence for 'image', for absent classes).
      lowres_confidence: float32 [B, h, w].
    """
    label, confidence = _prediction(out.logits)
    if config.weak_label in ("point", "coarse"):
        weak = target["weak_label"]
        label = jnp.where(weak != IGNORE_LABEL, weak, label).astype(jnp.int32)
    weight, q = pseudo_label_weight(confidence, config, axis_name)
    low_label, low_confidence = _prediction(out.lowres_logits)
    masked = jnp.where(low_confidence < config.pseudo.proto_threshold, IGNORE_LABEL, low_label)
    if config.weak_label == "image" and config.pseudo.filter_by_presence:
        batch = masked.shape[0]
        ids = jnp.clip(masked, 0, config.num_classes - 1).reshape(batch, -1)
        present = jnp.take_along_axis(target["presence"], ids, axis=1).reshape(masked.shape)
        masked = jnp.where(present > 0, masked, IGNORE_LABEL)
    return {
        "features": out.features,
        "label": label,
        "weight": weight,
        "q": q,
        "masked_lowres": masked.astype(jnp.int32),
        "lowres_confidence": low_confidence,
    }


def update_target_prototypes(
    target_prototypes: jax.Array,
    teacher: dict[str, jax.Array],
    weak_label: jax.Array,
    config: ml_collections.ConfigDict,
    axis_name: str | None,
) -> jax.Array:
    """Target prototypes from the teacher features, per weak-label kind (METHOD.md s. 7).

    coarse: center = weak label at feature resolution, member = fuse(masked pseudo, weak).
    point: as coarse, but the class means use the features bilinearly upsampled to
      label resolution at the point pixels.
    image / none: center = member = the confident teacher pseudo label.
    """
    features = teacher["features"]
    masked = teacher["masked_lowres"]
    if config.weak_label in ("point", "coarse"):
        member = label_ops.fuse(masked, weak_label)
        # Points would vanish at feature resolution: their class means are taken from
        # the features bilinearly upsampled to label resolution, which
        # `update_prototypes` computes without materialising the upsampled features.
        if config.weak_label == "coarse":
            center = label_ops.resize_nearest(weak_label, features.shape[1:3])
        else:
            center = weak_label
        return prototypes.update_prototypes(
            target_prototypes, features, center, member, axis_name=axis_name
        )
    return prototypes.update_prototypes(
        target_prototypes, features, masked, masked, axis_name=axis_name
    )


def mixed_batch(
    key: jax.Array,
    source_image: jax.Array,
    source_label: jax.Array,
    target_image: jax.Array,
    teacher: dict[str, jax.Array],
    config: ml_collections.ConfigDict,
) -> augment.MixedBatch:
    """ClassMix (or, disabled, the target alone) then strong augmentation (section 10)."""
    mix_key, aug_key = jax.random.split(key)
    if config.classmix.enabled:
        mixed = augment.classmix(
            mix_key,
            source_image,
            source_label,
            target_image,
            teacher["label"],
            teacher["weight"],
            per_image=config.classmix.per_image,
        )
    else:
        mixed = augment.MixedBatch(
            image=target_image,
            label=teacher["label"],
            weight=teacher["weight"],
            mask=jnp.zeros(teacher["label"].shape, bool),
        )
    augmented = augment.strong_augment(
        aug_key,
        augment.denormalize(mixed.image),
        jitter_prob=config.classmix.jitter_prob,
        jitter_strength=config.classmix.jitter_strength,
        blur_prob=config.classmix.blur_prob,
        blur_sigma=tuple(config.classmix.blur_sigma),
        per_image_decisions=config.classmix.per_image_augment,
    )
    return mixed._replace(image=augment.normalize(augmented * 255.0))


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


def _contrastive(key, features, label, pred, prob, domain, protos, config, *, inter: bool):
    """One of the three sampled pixel-to-prototype losses; returns (loss, num_anchors)."""
    loss_config = config.loss
    return losses.sampled_contrastive_loss(
        key,
        features,
        label,
        pred,
        prob,
        domain,
        jax.lax.stop_gradient(protos),
        max_views=loss_config.max_views,
        max_samples=loss_config.inter_max_samples if inter else loss_config.intra_max_samples,
        easy_threshold=(
            loss_config.inter_easy_threshold if inter else loss_config.intra_easy_threshold
        ),
        temperature=loss_config.temperature,
        base_temperature=loss_config.base_temperature,
        cross_domain=inter,
    )


def contrastive_losses(
    keys: dict[str, jax.Array],
    out_s: deeplab.SegmentationOutput,
    out_u: deeplab.SegmentationOutput,
    source_label: jax.Array,
    weak_label: jax.Array,
    teacher: dict[str, jax.Array],
    source_protos: jax.Array,
    target_protos: jax.Array,
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The three unweighted pixel-to-prototype losses of section 4.9 (inputs: section 8).

    Args:
      keys: PRNG keys 'inter', 'intra_src', 'intra_tgt' for the anchor sampling.
      out_s, out_u: the student's outputs on the source and target batches.
      source_label: int32 [B, H, W]; weak_label: int32 [B, H, W] (255 where unlabelled).
      teacher: `pseudo_labels` of the teacher ('features', 'masked_lowres',
        'lowres_confidence').
      source_protos, target_protos: float32 [C, D], this step's prototypes.
    Returns:
      ({'inter', 'intra_src', 'intra_tgt'}: float32 [] losses,
       the same keys: number of sampled anchors on this device).
    """
    src_pred, src_prob = _prediction(out_s.lowres_logits)
    src_label = label_ops.fuse(src_pred, source_label)
    # `inter` takes the source labels plainly downsampled (no fusion), as the reference.
    src_plain = label_ops.resize_nearest(source_label, src_pred.shape[1:3])
    tgt_label = label_ops.fuse(teacher["masked_lowres"], weak_label)
    u_pred, u_prob = _prediction(out_u.lowres_logits)
    batch_size = source_label.shape[0]
    source_domain = jnp.zeros(batch_size, jnp.int32)
    target_domain = jnp.ones(batch_size, jnp.int32)
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)
    inputs = {
        # Source student and target teacher anchors against the target prototypes.
        "inter": (
            cat(out_s.features, teacher["features"]),
            cat(src_plain, tgt_label),
            cat(src_pred, teacher["masked_lowres"]),
            cat(src_prob, teacher["lowres_confidence"]),
            cat(source_domain, target_domain),
            target_protos,
        ),
        "intra_src": (out_s.features, src_label, src_pred, src_prob, source_domain, source_protos),
        "intra_tgt": (
            out_u.features,
            label_ops.fuse(u_pred, weak_label),
            u_pred,
            u_prob,
            target_domain,
            target_protos,
        ),
    }
    results = {
        name: _contrastive(keys[name], *args, config, inter=name == "inter")
        for name, args in inputs.items()
    }
    return (
        {name: loss for name, (loss, _) in results.items()},
        {name: count for name, (_, count) in results.items()},
    )


def _apply_update(
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    optimizer: optax.GradientTransformation,
    new_values: dict[str, Any],
) -> tuple[TrainState, jax.Array, jax.Array]:
    """SGD update guarded against non-finite loss/gradients (section 4.12).

    If the loss or any gradient is not finite, params, the momentum and the fields in
    `new_values` (batch_stats, prototypes) keep their old values and skipped_steps += 1,
    while the learning-rate schedule still follows `step`; jnp.where over the trees
    keeps it one compiled program. Returns (state, grad_norm, ok).
    """
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    fields = {name: keep(value, getattr(state, name)) for name, value in new_values.items()}
    # A skipped step keeps the momentum but still advances the schedule, as the reference.
    opt_state = optim.set_schedule_step(keep(opt_state, state.opt_state), state.step + 1)
    state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=opt_state,
        skipped_steps=state.skipped_steps + jnp.where(ok, 0, 1).astype(jnp.int32),
        **fields,
    )
    return state, grad_norm, ok


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
    """One adaptation step (METHOD.md section 4), per device.

    Student BatchNorm statistics are chained through the three student forward passes
    (target, source, mixed), each a momentum update as in the reference, where every
    train-mode forward updates the running statistics.

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
      term (pmean over devices), total, learning_rate (backbone), the confident fraction
      q, anchors_<loss> (sampled anchors per device, averaged), grad_norm, skipped_steps.
    """
    names = ADAPT_KEY_NAMES
    keys = dict(zip(names, jax.random.split(step_key(state, axis_name), len(names)), strict=True))
    source, target = batch["source"], batch["target"]
    source_image = input_images(keys["jitter_s"], source["image"], config)
    target_image = input_images(keys["jitter_t"], target["image"], config)
    source_label = source["label"].astype(jnp.int32)
    weak_label, presence = target_weak_labels(target, config)
    weak_kind = config.weak_label
    w = config.loss

    # (1) Teacher EMA from the student of the previous step.
    teacher_params, teacher_batch_stats = ema_update(state, config)
    # (4)-(6) Teacher pseudo labels and weights; independent of the student parameters.
    teacher, teacher_batch_stats = teacher_pseudo_labels(
        model,
        teacher_params,
        teacher_batch_stats,
        target_image,
        {"weak_label": weak_label, "presence": presence},
        config,
        axis_name,
    )
    # (7, target) Prototypes from the teacher.
    target_protos = update_target_prototypes(
        state.target_prototypes, teacher, weak_label, config, axis_name
    )
    # (10, inputs) ClassMix and strong augmentation do not depend on the parameters.
    mixed = mixed_batch(keys["mix"], source_image, source_label, target_image, teacher, config)
    ramp = (state.step >= w.contrast_start).astype(jnp.float32)  # c = i in section 4.11.
    zero = jnp.zeros((), jnp.float32)

    def loss_fn(params):
        terms, counts = {}, {}
        # (2) Student on target.
        out_u, batch_stats = _forward(model, params, state.batch_stats, target_image)
        if weak_kind in ("point", "coarse"):
            terms["seg_u"] = w.seg_u * losses.cross_entropy(out_u.logits, weak_label)
        if weak_kind != "none":  # Plain UDA has no presence vector to learn from.
            terms["im_u"] = (
                ramp * w.im_u * losses.image_level_loss(out_u.logits, presence)
                if contrast_on
                else zero
            )
        # (3) Student on source.
        out_s, batch_stats = _forward(model, params, batch_stats, source_image)
        terms["seg_s"] = w.seg_s * losses.cross_entropy(out_s.logits, source_label)
        terms["edge_s"] = w.edge_s * _boundary_loss(
            out_s.logits, source_label, keys["edge"], config, axis_name
        )
        # (7, source) Source prototypes from the student's source features.
        feature_size = out_s.features.shape[1:3]
        source_low = label_ops.resize_nearest(source_label, feature_size)
        source_protos = prototypes.update_prototypes(
            state.source_prototypes, out_s.features, source_low, source_low, axis_name=axis_name
        )
        # (8) Image-level loss of the prototype logits (weak labels only).
        if weak_kind != "none" and contrast_on:
            proto_logits = jnp.einsum(
                "bhwd,cd->bhwc", out_u.features, jax.lax.stop_gradient(target_protos)
            )
            terms["im_proto"] = ramp * w.im_proto * losses.image_level_loss(proto_logits, presence)
        elif weak_kind != "none":
            terms["im_proto"] = zero
        # (9) Contrastive losses.
        if w.use_contrast and contrast_on:
            contrast, counts = contrastive_losses(
                keys,
                out_s,
                out_u,
                source_label,
                weak_label,
                teacher,
                source_protos,
                target_protos,
                config,
            )
            terms.update({name: ramp * w[name] * loss for name, loss in contrast.items()})
        elif w.use_contrast:
            terms.update({name: zero for name in CONTRAST_TERMS})
            counts = {name: jnp.zeros((), jnp.int32) for name in CONTRAST_TERMS}
        # (10) Student on the mixed batch.
        out_m, batch_stats = _forward(model, params, batch_stats, mixed.image)
        terms["seg_mix"] = w.seg_mix * losses.cross_entropy(out_m.logits, mixed.label, mixed.weight)
        # (11) Total, averaged over devices: this is the loss that is differentiated.
        total = jax.lax.pmean(sum(terms.values()), axis_name)
        return total, (terms, counts, batch_stats, source_protos)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, (terms, counts, batch_stats, source_protos)), grads = grad_fn(state.params)
    # (12) Guarded update; teacher and prototypes are carried to the next step.
    state = state.replace(teacher_params=teacher_params, teacher_batch_stats=teacher_batch_stats)
    new_state, grad_norm, _ = _apply_update(
        state,
        grads,
        total,
        optimizer,
        {
            "batch_stats": batch_stats,
            "source_prototypes": source_protos,
            "target_prototypes": target_protos,
        },
    )
    step_metrics = {name: jax.lax.pmean(value, axis_name) for name, value in terms.items()}
    for name, count in counts.items():
        step_metrics[f"anchors_{name}"] = jax.lax.pmean(count.astype(jnp.float32), axis_name)
    step_metrics.update(
        total=total,
        learning_rate=optim.learning_rate_schedule(config)(state.step),
        pseudo_confident_fraction=teacher["q"],
        grad_norm=grad_norm,
        skipped_steps=new_state.skipped_steps.astype(jnp.float32),
    )
    return new_state, step_metrics


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
    both a student and a teacher.
    """
    key, jitter_key = jax.random.split(step_key(state, axis_name))
    image = input_images(jitter_key, batch["source"]["image"], config)
    label = batch["source"]["label"].astype(jnp.int32)
    teacher_params, teacher_batch_stats = ema_update(state, config)

    def loss_fn(params):
        out, batch_stats = _forward(model, params, state.batch_stats, image)
        terms = {
            "seg_s": config.loss.seg_s * losses.cross_entropy(out.logits, label),
            "edge_s": config.loss.edge_s
            * _boundary_loss(out.logits, label, key, config, axis_name),
        }
        return jax.lax.pmean(sum(terms.values()), axis_name), (terms, batch_stats)

    (total, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.replace(teacher_params=teacher_params, teacher_batch_stats=teacher_batch_stats)
    new_state, grad_norm, _ = _apply_update(
        state, grads, total, optimizer, {"batch_stats": batch_stats}
    )
    step_metrics = {name: jax.lax.pmean(value, axis_name) for name, value in terms.items()}
    step_metrics.update(
        total=total,
        learning_rate=optim.learning_rate_schedule(config)(state.step),
        grad_norm=grad_norm,
        skipped_steps=new_state.skipped_steps.astype(jnp.float32),
    )
    return new_state, step_metrics


def _resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of [B, H, W, K] without antialiasing (as torch's interpolate)."""
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(
        x, (x.shape[0], height, width, x.shape[3]), method="bilinear", antialias=False
    )


def predict(
    variables: dict[str, Any],
    images: jax.Array,
    *,
    model: nn.Module,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> jax.Array:
    """Eval-mode logits, averaged over scales (and horizontal flips) at full size.

    Args:
      variables: {'params', 'batch_stats'} of the student or the teacher.
      images: uint8 [B, H, W, 3].
      model: the DeepLabV2.
      scales: input scales; each prediction is resized back to (H, W) before averaging.
      flip: also average the prediction of the horizontally flipped image.
    Returns:
      float32 [B, H, W, C] averaged logits.
    """
    x = augment.normalize(images)
    _, height, width, _ = x.shape
    total, count = 0.0, 0
    for scale in scales:
        scaled = _resize(x, round(height * scale), round(width * scale))
        flips = (False, True) if flip else (False,)
        for flipped in flips:
            inputs = scaled[:, :, ::-1] if flipped else scaled
            logits = model.apply(variables, inputs, train=False).logits
            logits = logits[:, :, ::-1] if flipped else logits
            total = total + _resize(logits.astype(jnp.float32), height, width)
            count += 1
    return total / count


def eval_step(
    variables: dict[str, Any],
    batch: Batch,
    *,
    model: nn.Module,
    num_classes: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    images_per_forward: int = 0,
    axis_name: str = "data",
) -> jax.Array:
    """Confusion matrix int32 [C, C] (rows = ground truth) of the batch, psum-ed over devices.

    batch: {'image': uint8 [B, H, W, 3], 'label': int32 [B, H, W], 'mask': bool [B]};
    masked-out (padding) images count nothing. With 0 < images_per_forward < B the
    forward runs on chunks of that many images in sequence (`lax.map`): the same
    result, with the full-resolution logits of only one chunk alive at a time, and a
    chunk of padding only is skipped (`lax.cond`), so the padded last batch of a split
    costs only its real images.
    """

    def confusion_of(images, labels, mask):
        logits = predict(variables, images, model=model, scales=scales, flip=flip)
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return metrics.batch_confusion_matrix(
            pred, labels.astype(jnp.int32), num_classes, mask=mask
        )

    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    chunk = images_per_forward
    if 0 < chunk < images.shape[0]:
        if images.shape[0] % chunk:
            raise ValueError(
                f"images_per_forward={chunk} does not divide the batch {images.shape[0]}"
            )
        split = lambda x: x.reshape(images.shape[0] // chunk, chunk, *x.shape[1:])
        # Varying over the devices like the computed branch (shard_map's check_vma).
        empty = jax.lax.pcast(
            jnp.zeros((num_classes, num_classes), jnp.int32), (axis_name,), to="varying"
        )
        per_chunk = jax.lax.map(
            lambda xs: jax.lax.cond(jnp.any(xs[2]), confusion_of, lambda *_: empty, *xs),
            (split(images), split(labels), split(mask)),
        )
        confusion = jnp.sum(per_chunk, axis=0)
    else:
        confusion = confusion_of(images, labels, mask)
    return jax.lax.psum(confusion, axis_name)
