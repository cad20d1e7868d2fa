"""Confusion matrices and IoU (docs/method.md §13).

Rows are ground truth, columns prediction. Pixels whose label is `ignore_label` or
outside [0, C), and pixels whose prediction is outside [0, C), are not counted.
`batch_confusion_matrix` is the jittable per-batch version for the eval step
(int32, accumulated on the host in int64 with `confusion_matrix`'s dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wsda_jax import classes


def _check_pred_label(pred, label) -> None:
    if np.shape(pred) != np.shape(label):
        raise ValueError(f"pred {np.shape(pred)} and label {np.shape(label)} must have one shape")


def confusion_matrix(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_label: int = classes.IGNORE_LABEL
) -> np.ndarray:
    """Host confusion matrix `[C, C]` int64 of integer maps of any (equal) shape."""
    _check_pred_label(pred, label)
    pred = np.asarray(pred).astype(np.int64).reshape(-1)
    label = np.asarray(label).astype(np.int64).reshape(-1)
    keep = (label != ignore_label) & (label >= 0) & (label < num_classes)
    keep &= (pred >= 0) & (pred < num_classes)
    index = label[keep] * num_classes + pred[keep]
    counts = np.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def batch_confusion_matrix(
    pred: jax.Array,
    label: jax.Array,
    num_classes: int,
    mask: jax.Array | None = None,
    ignore_label: int = classes.IGNORE_LABEL,
) -> jax.Array:
    """Jittable confusion matrix `[C, C]` int32 of `[B, H, W]` maps.

    mask: optional bool `[B]`; False drops a padded image of the last eval batch.
    """
    _check_pred_label(pred, label)
    if label.ndim != 3:
        raise ValueError(f"label must be [B, H, W], got shape {label.shape}")
    if mask is not None and mask.shape != label.shape[:1]:
        raise ValueError(f"mask must be [B] = ({label.shape[0]},), got shape {mask.shape}")
    pred = pred.astype(jnp.int32)
    label = label.astype(jnp.int32)
    keep = (label != ignore_label) & (label >= 0) & (label < num_classes)
    keep &= (pred >= 0) & (pred < num_classes)
    if mask is not None:
        keep &= mask.astype(bool)[:, None, None]
    index = jnp.where(keep, label * num_classes + pred, 0)
    counts = jax.ops.segment_sum(
        keep.astype(jnp.int32).reshape(-1), index.reshape(-1), num_classes * num_classes
    )
    return counts.reshape(num_classes, num_classes)


def iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU `TP / (TP + FP + FN)`, `[C]` float64; NaN where the class never occurs."""
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be square [C, C], got shape {confusion.shape}")
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def mean_iou(confusion: np.ndarray, class_subset: Sequence[int] | None = None) -> float:
    """Mean IoU over `class_subset` (all classes by default), ignoring NaN classes.

    NaN when no class of the subset occurs at all.
    """
    per_class = iou(confusion)
    if class_subset is not None:
        subset = np.asarray(class_subset, dtype=np.int64)
        if subset.size and (subset.min() < 0 or subset.max() >= per_class.shape[0]):
            raise ValueError(f"class_subset {list(class_subset)} outside [0, {per_class.shape[0]})")
        per_class = per_class[subset]
    finite = per_class[~np.isnan(per_class)]
    return float(finite.mean()) if finite.size else float("nan")
