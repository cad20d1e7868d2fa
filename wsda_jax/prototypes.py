"""Class prototypes from pixel features (docs/method.md §7).

For every class c present in `center`: `m_c` = mean feature over the `center == c`
pixels; over the `member == c` pixels the weights `w_i = F_i . m_c` are normalised
to sum to 1 and `P_c = sum_i w_i F_i`. Classes absent from `center` keep their
previous prototype. All per-class sums are one-hot matmuls (no loop over classes)
and, with `axis_name`, are `psum`-ed before any division, so every device holds the
prototypes of the global batch (never an average of per-device means).

Which pixels centre and which join each prototype is chosen here too:
`update_source_prototypes` (the source labels) and `update_target_prototypes` (the
teacher's confident pseudo labels and the weak label map, per weak-label kind).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsda_jax import config_lib, label_ops


def _class_sums(
    features: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Per-class feature sums `[C, D]` and pixel counts `[C]` (labels outside [0, C) skipped)."""
    flat = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
    one_hot = jax.nn.one_hot(labels.reshape(-1), num_classes, dtype=jnp.float32)
    return one_hot.T @ flat, jnp.sum(one_hot, axis=0)


def _upsampled_class_sums(
    features: jax.Array, center: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Class sums `[C, D]` and counts `[C]` of the features bilinearly upsampled to `center`.

    Upsampling is linear and acts per channel, so `sum_p [center_p = c] up(F)_p` equals
    `sum_q up^T([center = c])_q F_q`: the transposed resize of the `[B, H', W', C]`
    one-hot gives per-class weights at feature resolution, and the `[B, H', W', D]`
    upsampled features (1 GiB at 512x512x256, batch 4) are never built.
    """
    _, height, width, _ = features.shape
    one_hot = jax.nn.one_hot(center, num_classes, dtype=jnp.float32)
    # Separable bilinear resize: column j of each matrix is the upsampled unit vector
    # e_j, so contracting with them applies the transposed resize.
    rows = jax.image.resize(jnp.eye(height), (center.shape[1], height), method="bilinear")
    cols = jax.image.resize(jnp.eye(width), (center.shape[2], width), method="bilinear")
    weights = jnp.einsum("bHWc,Hh->bhWc", one_hot, rows)
    weights = jnp.einsum("bhWc,Ww->bhwc", weights, cols)
    sums = jnp.einsum("bhwc,bhwd->cd", weights, features.astype(jnp.float32))
    return sums, jnp.sum(one_hot, axis=(0, 1, 2))


def update_prototypes(
    prototypes: jax.Array,
    features: jax.Array,
    center: jax.Array,
    member: jax.Array,
    *,
    axis_name: str | None = None,
) -> jax.Array:
    """Returns the updated prototypes `[C, D]` float32, under stop_gradient.

    Args:
      prototypes: float `[C, D]`, the previous prototypes.
      features: float `[B, h, w, D]` pixel features (members are weighted from these).
      center: int `[B, H', W']` label map that selects the pixels of the class means:
        at the resolution of `features`, or at a higher one, where the means are those
        of the features bilinearly upsampled (`jax.image.resize`) to `(H', W')` (the
        `point` variant: points survive), computed without materialising them.
      member: int `[B, h, w]` label map that selects the pixels averaged into `P_c`.
      axis_name: mapped axis over which the sums and counts are `psum`-ed.

    A class present in `center` whose member weights sum to exactly 0 (in particular
    one with no member pixel) also keeps its previous prototype: dividing by zero
    would otherwise write NaN into the state.
    """
    if prototypes.ndim != 2:
        raise ValueError(f"prototypes must be [C, D], got shape {prototypes.shape}")
    num_classes, dim = prototypes.shape
    if features.ndim != 4 or features.shape[-1] != dim:
        raise ValueError(f"features must be [B, h, w, D={dim}], got shape {features.shape}")
    if member.shape != features.shape[:3]:
        raise ValueError(f"member {member.shape} must match features {features.shape[:3]}")
    if center.ndim != 3 or center.shape[0] != features.shape[0]:
        raise ValueError(f"center must be [B={features.shape[0]}, H', W'], got {center.shape}")
    if center.shape[1] < features.shape[1] or center.shape[2] < features.shape[2]:
        raise ValueError(
            f"center {center.shape} must match features {features.shape[:3]} or be larger"
        )
    upsampled_center = center.shape != member.shape
    label_ops.check_label_values(center, num_classes, "center")
    label_ops.check_label_values(member, num_classes, "member")

    features = jax.lax.stop_gradient(features)
    psum = (lambda x: jax.lax.psum(x, axis_name)) if axis_name is not None else (lambda x: x)

    if upsampled_center:
        center_sum, center_count = _upsampled_class_sums(features, center, num_classes)
    else:
        center_sum, center_count = _class_sums(features, center, num_classes)
    center_sum, center_count = psum(center_sum), psum(center_count)
    means = center_sum / jnp.maximum(center_count, 1.0)[:, None]  # m_c, [C, D]

    flat = features.reshape(-1, dim).astype(jnp.float32)
    member_hot = jax.nn.one_hot(member.reshape(-1), num_classes, dtype=jnp.float32)
    weights = (flat @ means.T) * member_hot  # w_i for member == c, else 0; [N, C]
    weighted_sum = psum(weights.T @ flat)  # [C, D]
    weight_total = psum(jnp.sum(weights, axis=0))  # [C]

    update = (center_count > 0) & (weight_total != 0)
    new = weighted_sum / jnp.where(update, weight_total, 1.0)[:, None]
    result = jnp.where(update[:, None], new, prototypes.astype(jnp.float32))
    return jax.lax.stop_gradient(result)


def update_source_prototypes(
    prototypes: jax.Array,
    features: jax.Array,
    source_label: jax.Array,
    *,
    axis_name: str | None = None,
) -> jax.Array:
    """Source prototypes `[C, D]` (§4.7): center = member = the int `[B, H, W]` source
    labels at the resolution of the float `[B, h, w, D]` features (nearest)."""
    low = label_ops.resize_nearest(source_label, features.shape[1:3])
    return update_prototypes(prototypes, features, low, low, axis_name=axis_name)


def update_target_prototypes(
    prototypes: jax.Array,
    features: jax.Array,
    pseudo_label: jax.Array,
    weak_label: jax.Array,
    *,
    weak_label_kind: str,
    axis_name: str | None = None,
) -> jax.Array:
    """Target prototypes `[C, D]` from the teacher's features, per weak-label kind (§7).

    Args:
      features: float `[B, h, w, D]`, the teacher's target features.
      pseudo_label: int `[B, h, w]`, the teacher's low-resolution pseudo label, 255 where
        it is not confident (`pseudo_labels.PseudoLabels.masked_lowres`).
      weak_label: int `[B, H, W]`, the weak label map (255 where unlabelled).
      weak_label_kind: static `config.weak_label`.

    coarse: center = weak label at feature resolution, member = fuse(pseudo, weak).
    point: as coarse, but the class means use the features bilinearly upsampled to
      label resolution at the point pixels.
    image / none: center = member = the confident pseudo label.
    """
    if not config_lib.has_label_map(weak_label_kind):
        return update_prototypes(
            prototypes, features, pseudo_label, pseudo_label, axis_name=axis_name
        )
    member = label_ops.fuse(pseudo_label, weak_label)
    # Points would vanish at feature resolution: a label-resolution `center` makes
    # `update_prototypes` take the class means of the bilinearly upsampled features
    # (without materialising them).
    if weak_label_kind == "point":
        center = weak_label
    else:
        center = label_ops.resize_nearest(weak_label, features.shape[1:3])
    return update_prototypes(prototypes, features, center, member, axis_name=axis_name)
