"""The teacher's pseudo labels and what the step builds from them (docs/method.md §4.4-4.7, 10).

`teacher_pseudo_labels` runs the EMA teacher on the target batch and returns the
full-resolution pseudo label (weak label written over it), its ClassMix pixel weight
(`pseudo_label_weight`) and the masked low-resolution label that the prototypes and the
contrastive losses use; `update_target_prototypes` builds the target prototypes from them
per weak-label kind, and `mixed_batch` is ClassMix plus strong augmentation of the
student's mixed input. Nothing here has a gradient. The fraction `q` and the prototype
sums are `psum`s over `axis_name`, so every device sees the global batch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wsda_jax import augment, classes, label_ops, prototypes
from wsda_jax.models import deeplab

PseudoLabels = dict[str, jax.Array]


def prediction(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., C] logits -> (int32 argmax [...], float32 max softmax [...]), no gradient."""
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)


def pseudo_label_weight(
    confidence: jax.Array, config: ml_collections.ConfigDict, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
    """ClassMix pixel weight of the pseudo labels (docs/method.md §4.6).

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


def pseudo_labels(
    out: Any, target: dict[str, jax.Array], config: ml_collections.ConfigDict, axis_name: str | None
) -> PseudoLabels:
    """Pseudo labels, ClassMix weights and prototype labels from the teacher's outputs.

    Args:
      out: the teacher's SegmentationOutput on the target batch.
      target: the step's target labels ('weak_label' int32 [B, H, W], 'presence' float32
        [B, C]).
    Returns a dict:
      features: [B, h, w, D] teacher features.
      label: int32 [B, H, W] full-res pseudo label, weak label written over it (point/coarse).
      weight: float32 [B, H, W] ClassMix pixel weight; q: [] confident fraction.
      masked_lowres: int32 [B, h, w] low-res pseudo label, 255 where confidence <
        proto_threshold (and, with filter_by_presence for 'image', for absent classes).
      lowres_confidence: float32 [B, h, w].
    """
    label, confidence = prediction(out.logits)
    if config.weak_label in ("point", "coarse"):
        weak = target["weak_label"]
        label = jnp.where(weak != classes.IGNORE_LABEL, weak, label).astype(jnp.int32)
    weight, q = pseudo_label_weight(confidence, config, axis_name)
    low_label, low_confidence = prediction(out.lowres_logits)
    masked = jnp.where(
        low_confidence < config.pseudo.proto_threshold, classes.IGNORE_LABEL, low_label
    )
    if config.weak_label == "image" and config.pseudo.filter_by_presence:
        batch = masked.shape[0]
        ids = jnp.clip(masked, 0, config.num_classes - 1).reshape(batch, -1)
        present = jnp.take_along_axis(target["presence"], ids, axis=1).reshape(masked.shape)
        masked = jnp.where(present > 0, masked, classes.IGNORE_LABEL)
    return {
        "features": out.features,
        "label": label,
        "weight": weight,
        "q": q,
        "masked_lowres": masked.astype(jnp.int32),
        "lowres_confidence": low_confidence,
    }


def teacher_pseudo_labels(
    model: nn.Module,
    teacher_params: Any,
    teacher_batch_stats: Any,
    target_image: jax.Array,
    target: dict[str, jax.Array],
    config: ml_collections.ConfigDict,
    axis_name: str | None,
) -> tuple[PseudoLabels, Any]:
    """Teacher on the target batch, then `pseudo_labels` (§4.4-4.6).

    The teacher runs with BatchNorm in training mode (target batch statistics), as the
    reference, whose forward also updates the teacher's running statistics; the next
    step's EMA then blends them with the student's. Returns (pseudo labels, the teacher's
    batch_stats after this forward: updated by it when config.ema.teacher_bn_update, else
    unchanged).
    """
    out, updated = deeplab.train_forward(model, teacher_params, teacher_batch_stats, target_image)
    batch_stats = updated if config.ema.teacher_bn_update else teacher_batch_stats
    pseudo = pseudo_labels(jax.lax.stop_gradient(out), target, config, axis_name)
    return pseudo, jax.lax.stop_gradient(batch_stats)


def update_target_prototypes(
    target_prototypes: jax.Array,
    teacher: PseudoLabels,
    weak_label: jax.Array,
    config: ml_collections.ConfigDict,
    axis_name: str | None,
) -> jax.Array:
    """Target prototypes [C, D] from the teacher features, per weak-label kind (§7).

    coarse: center = weak label at feature resolution, member = fuse(masked pseudo, weak).
    point: as coarse, but the class means use the features bilinearly upsampled to
      label resolution at the point pixels.
    image / none: center = member = the confident teacher pseudo label.
    """
    features = teacher["features"]
    masked = teacher["masked_lowres"]
    if config.weak_label in ("point", "coarse"):
        member = label_ops.fuse(masked, weak_label)
        # Points would vanish at feature resolution: a label-resolution `center` makes
        # `update_prototypes` take the class means of the bilinearly upsampled features
        # (without materialising them).
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
    teacher: PseudoLabels,
    config: ml_collections.ConfigDict,
) -> augment.MixedBatch:
    """ClassMix (or, disabled, the target alone) then strong augmentation (§10).

    Images are float32 [B, H, W, 3] normalised; returns the normalised mixed image, its
    int32 [B, H, W] label (source / pseudo label) and float32 [B, H, W] pixel weight.
    """
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
