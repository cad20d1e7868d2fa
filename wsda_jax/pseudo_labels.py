"""The teacher's pseudo labels and their weight (docs/method.md §4.4-4.6).

`teacher_pseudo_labels` runs the EMA teacher on the target batch and returns a
`PseudoLabels`: the full-resolution pseudo label (weak label map written over it), its
ClassMix pixel weight (`pseudo_label_weight`), and the masked low-resolution label with
its confidence that the prototypes and the contrastive losses use. Nothing here has a
gradient. The fraction `q` is a `psum` over `axis_name`, so every device sees the global
batch.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wsda_jax import classes, config_lib, label_ops
from wsda_jax.models import deeplab


@flax.struct.dataclass
class PseudoLabels:
    """The teacher's view of the target batch (B images, C classes, D feature channels).

    features: float32 [B, h, w, D], the teacher's features.
    label: int32 [B, H, W], full-resolution pseudo label, the weak label map written over
      it (point/coarse).
    weight: float32 [B, H, W], ClassMix pixel weight; q: float32 [], confident fraction.
    masked_lowres: int32 [B, h, w], low-resolution pseudo label, 255 where confidence <
      proto_threshold (and, with filter_by_presence for 'image', for absent classes).
    lowres_confidence: float32 [B, h, w], its confidence.
    """

    features: jax.Array
    label: jax.Array
    weight: jax.Array
    q: jax.Array
    masked_lowres: jax.Array
    lowres_confidence: jax.Array


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
    out: Any,
    weak_label: jax.Array,
    presence: jax.Array,
    config: ml_collections.ConfigDict,
    axis_name: str | None,
) -> PseudoLabels:
    """Pseudo labels, ClassMix weights and prototype labels from the teacher's outputs.

    Args:
      out: the teacher's SegmentationOutput on the target batch.
      weak_label: int32 [B, H, W], the step's weak label map (255 where unlabelled).
      presence: float32 [B, C], the step's presence vector.
    """
    label, confidence = label_ops.prediction(out.logits)
    if config_lib.has_label_map(config.weak_label):
        label = jnp.where(weak_label != classes.IGNORE_LABEL, weak_label, label)
        label = label.astype(jnp.int32)
    weight, q = pseudo_label_weight(confidence, config, axis_name)
    low_label, low_confidence = label_ops.prediction(out.lowres_logits)
    masked = jnp.where(
        low_confidence < config.pseudo.proto_threshold, classes.IGNORE_LABEL, low_label
    )
    if config.weak_label == "image" and config.pseudo.filter_by_presence:
        batch = masked.shape[0]
        ids = jnp.clip(masked, 0, config.num_classes - 1).reshape(batch, -1)
        present = jnp.take_along_axis(presence, ids, axis=1).reshape(masked.shape)
        masked = jnp.where(present > 0, masked, classes.IGNORE_LABEL)
    return PseudoLabels(
        features=out.features,
        label=label,
        weight=weight,
        q=q,
        masked_lowres=masked.astype(jnp.int32),
        lowres_confidence=low_confidence,
    )


def teacher_pseudo_labels(
    model: nn.Module,
    teacher_params: Any,
    teacher_batch_stats: Any,
    target_image: jax.Array,
    weak_label: jax.Array,
    presence: jax.Array,
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
    pseudo = pseudo_labels(jax.lax.stop_gradient(out), weak_label, presence, config, axis_name)
    return pseudo, jax.lax.stop_gradient(batch_stats)
