"""The three pixel-to-prototype contrastive losses of the step and their inputs (docs/method.md §8).

`inter`: source student and target teacher anchors against the target prototypes,
positives only across domains; `intra_src`: source features against the source
prototypes; `intra_tgt`: the student's target features against the target prototypes.
The label maps are built with `label_ops.fuse` at feature resolution; anchors are
sampled by `sampling.sample_anchors` inside `losses.sampled_contrastive_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from wsda_jax import label_ops, losses
from wsda_jax.models import deeplab

CONTRAST_TERMS = ("inter", "intra_src", "intra_tgt")


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


def intra_source_loss(
    key: jax.Array,
    out_s: deeplab.SegmentationOutput,
    source_label: jax.Array,
    source_protos: jax.Array,
    config: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array]:
    """`intra_src` alone: the student's source features against the source prototypes.

    The adaptation step computes it with the other two losses (`contrastive_losses`);
    stage 1 can add it to warm up the projection head (config.loss.source_only_contrast).
    Args: source_label int32 [B, H, W]; source_protos float32 [C, D].
    Returns (float32 [] loss, int32 [] sampled anchors on this device).
    """
    src_pred, src_prob = label_ops.prediction(out_s.lowres_logits)
    source_domain = jnp.zeros(source_label.shape[0], jnp.int32)
    return _contrastive(
        key,
        out_s.features,
        label_ops.fuse(src_pred, source_label),
        src_pred,
        src_prob,
        source_domain,
        source_protos,
        config,
        inter=False,
    )


def contrastive_losses(
    keys: dict[str, jax.Array],
    out_s: deeplab.SegmentationOutput,
    out_u: deeplab.SegmentationOutput,
    source_label: jax.Array,
    weak_label: jax.Array,
    teacher_features: jax.Array,
    teacher_label: jax.Array,
    teacher_confidence: jax.Array,
    source_protos: jax.Array,
    target_protos: jax.Array,
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The three unweighted pixel-to-prototype losses of §4.9 (inputs: §8).

    Args:
      keys: PRNG keys 'inter', 'intra_src', 'intra_tgt' for the anchor sampling.
      out_s, out_u: the student's outputs on the source and target batches.
      source_label: int32 [B, H, W]; weak_label: int32 [B, H, W] (255 where unlabelled).
      teacher_features: float32 [B, h, w, D]; teacher_label: int32 [B, h, w], its confident
        low-resolution pseudo label (255 elsewhere); teacher_confidence: float32 [B, h, w]
        (`pseudo_labels.PseudoLabels` features, masked_lowres, lowres_confidence).
      source_protos, target_protos: float32 [C, D], this step's prototypes.
    Returns:
      ({'inter', 'intra_src', 'intra_tgt'}: float32 [] losses,
       the same keys: number of sampled anchors on this device).
    """
    src_pred, src_prob = label_ops.prediction(out_s.lowres_logits)
    # `inter` takes the source labels plainly downsampled (no fusion), as the reference.
    src_plain = label_ops.resize_nearest(source_label, src_pred.shape[1:3])
    tgt_label = label_ops.fuse(teacher_label, weak_label)
    u_pred, u_prob = label_ops.prediction(out_u.lowres_logits)
    batch_size = source_label.shape[0]
    source_domain = jnp.zeros(batch_size, jnp.int32)
    target_domain = jnp.ones(batch_size, jnp.int32)
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)
    inputs = {
        # Source student and target teacher anchors against the target prototypes.
        "inter": (
            cat(out_s.features, teacher_features),
            cat(src_plain, tgt_label),
            cat(src_pred, teacher_label),
            cat(src_prob, teacher_confidence),
            cat(source_domain, target_domain),
            target_protos,
        ),
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
        "inter": _contrastive(keys["inter"], *inputs["inter"], config, inter=True),
        "intra_src": intra_source_loss(
            keys["intra_src"], out_s, source_label, source_protos, config
        ),
        "intra_tgt": _contrastive(keys["intra_tgt"], *inputs["intra_tgt"], config, inter=False),
    }
    return (
        {name: loss for name, (loss, _) in results.items()},
        {name: count for name, (_, count) in results.items()},
    )
