"""Thing-class ImageNet feature distance (DAFormer, Hoyer et al., CVPR 2022): an option
beyond the reference (docs/daformer.md "ImageNet feature distance").

On the source images, the student's last encoder features are pulled towards those of a
frozen copy of the ImageNet-initialised encoder (`TrainState.imnet_encoder`), only where
the source label, downscaled to the feature map, is a thing class. DAFormer
(`mmseg/models/uda/dacs.py` `calc_feat_dist`, `masked_feat_dist`;
`mmseg/utils/utils.py` `downscale_label_ratio`):

    fd = mean over masked cells of || f_student - f_imagenet ||_2 (over channels)

with the mask: the cell's label (`downscale_label_ratio`, min ratio 0.75) is one of
`config.loss.imnet_fd_classes`. The term `imnet_fd` is weighted by `config.loss.imnet_fd`
(DAFormer's 0.005; 0 = off).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wsda_jax import classes
from wsda_jax.models import deeplab


def downscale_label_ratio(
    labels: jax.Array, factor: int, min_ratio: float, num_classes: int
) -> jax.Array:
    """int [B, H, W] labels -> int32 [B, H // factor, W // factor], DAFormer's rule.

    Each factor x factor cell takes the class covering most of it, the ignore label
    counted as one more class; it is 255 where that class is the ignore label or covers
    less than `min_ratio` of the cell (not nearest resizing: thin objects vanish, mixed
    cells are ignored). Rows and columns beyond a multiple of `factor` are dropped, as
    torch's avg_pool2d does.
    """
    if factor < 2:
        raise ValueError(f"downscale_label_ratio: factor {factor} must be > 1")
    batch, height, width = labels.shape
    h, w = height // factor, width // factor
    labels = labels[:, : h * factor, : w * factor].astype(jnp.int32)
    ids = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    one_hot = jax.nn.one_hot(ids, num_classes + 1, dtype=jnp.int8)
    counts = one_hot.reshape(batch, h, factor, w, factor, num_classes + 1)
    counts = counts.sum(axis=(2, 4), dtype=jnp.int32)
    ratio = counts.max(axis=-1).astype(jnp.float32) / (factor * factor)
    best = counts.argmax(axis=-1).astype(jnp.int32)
    ignored = (best == num_classes) | (ratio < min_ratio)
    return jnp.where(ignored, classes.IGNORE_LABEL, best)


def masked_feature_distance(student: jax.Array, frozen: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 scalar: the mean over `mask` [B, h, w] of the per-cell L2 norm over channels
    of `student - frozen` (both [B, h, w, C]); 0 when nothing is masked (DAFormer's mean
    of nothing is NaN, with a zero gradient).

    The norm's gradient at a zero difference is 0 (torch's subgradient), not NaN.
    """
    diff = student.astype(jnp.float32) - frozen.astype(jnp.float32)
    squared = jnp.sum(jnp.square(diff), axis=-1)
    positive = squared > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    return jnp.where(count > 0, jnp.sum(norm * mask) / jnp.maximum(count, 1.0), 0.0)


def thing_mask(labels: jax.Array, thing_classes: Sequence[int]) -> jax.Array:
    """bool [B, h, w]: the downscaled label is one of `thing_classes`."""
    return jnp.isin(labels, jnp.asarray(tuple(thing_classes), jnp.int32))


def feature_distance(
    student: jax.Array, frozen: jax.Array, labels: jax.Array, config: ml_collections.ConfigDict
) -> jax.Array:
    """The unweighted `imnet_fd` term: student and frozen encoder features [B, h, w, C],
    source labels [B, H, W] at the input resolution, downscaled by H // h."""
    factor = labels.shape[2] // student.shape[2]  # DAFormer: gt width // feature width.
    small = downscale_label_ratio(
        labels, factor, config.loss.imnet_fd_min_ratio, config.num_classes
    )
    if small.shape != student.shape[:3]:
        raise ValueError(
            f"imnet_fd: labels {labels.shape} downscaled by {factor} give {small.shape}, "
            f"the features are {student.shape[:3]}: the crop must be a multiple of the "
            "encoder's stride"
        )
    mask = thing_mask(small, config.loss.imnet_fd_classes)
    return masked_feature_distance(student, frozen, mask)


def forward_with_encoding(
    forward: Callable[..., tuple[deeplab.SegmentationOutput, Any]], *args: Any
) -> tuple[deeplab.SegmentationOutput, Any, jax.Array]:
    """`forward(*args)` (a model pass returning (out, batch_stats)) and the encoder's
    last feature map of the same pass: the output of the submodule named 'backbone' (its
    last stage when it returns one map per stage, as MiT does), what `model.encode`
    returns."""
    captured = []

    def keep_encoder_output(next_fun, args, call_kwargs, context):
        out = next_fun(*args, **call_kwargs)
        if context.module.name == "backbone" and context.method_name == "__call__":
            captured.append(out)
        return out

    with nn.intercept_methods(keep_encoder_output):
        out, batch_stats = forward(*args)
    if len(captured) != 1:
        raise ValueError(f"imnet_fd: expected one 'backbone' call, saw {len(captured)}")
    encoding = captured[0]
    if isinstance(encoding, list | tuple):
        encoding = encoding[-1]
    return out, batch_stats, encoding


def train_forward_with_encoding(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    dropout_key: jax.Array | None = None,
) -> tuple[deeplab.SegmentationOutput, Any, jax.Array]:
    """`deeplab.train_forward` and the encoder's last feature map of the same pass:
    (SegmentationOutput, the updated batch_stats, encoding [B, h, w, C]). The student's
    passes in the adaptation step all use it, jitted, so that the model is traced once;
    the passes that do not need the encoding drop it."""
    forward = functools.partial(deeplab.train_forward, model, params)
    return forward_with_encoding(forward, batch_stats, images, dropout_key)


def frozen_encoding(model: nn.Module, imnet_encoder: Any, images: jax.Array) -> jax.Array:
    """The frozen ImageNet encoder's last feature map (eval mode, no gradient)."""
    encoding = model.apply(imnet_encoder, images, train=False, method="encode")
    return jax.lax.stop_gradient(encoding)


def source_forward(
    model: nn.Module,
    forward: Callable[..., tuple[deeplab.SegmentationOutput, Any, jax.Array]],
    batch_stats: Any,
    inputs: Any,
    imnet_encoder: Any,
    config: ml_collections.ConfigDict,
    dropout_key: jax.Array | None = None,
) -> tuple[deeplab.SegmentationOutput, Any, dict[str, jax.Array]]:
    """The student's source pass `forward(batch_stats, images, dropout_key)` (its
    `train_forward_with_encoding` with model and params bound) and, with
    config.loss.imnet_fd > 0, the unweighted `imnet_fd` term: (out, batch_stats,
    {'imnet_fd': scalar} or {}).

    `inputs` holds `source_image` float32 [B, H, W, 3] and `source_label` int32 [B, H, W]
    (`step_inputs.AdaptInputs`).
    """
    images, labels = inputs.source_image, inputs.source_label
    out, batch_stats, student = forward(batch_stats, images, dropout_key)
    if config.loss.imnet_fd <= 0:
        return out, batch_stats, {}
    frozen = frozen_encoding(model, imnet_encoder, images)
    return out, batch_stats, {"imnet_fd": feature_distance(student, frozen, labels, config)}


def encoder_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The encoder's Flax variables ('backbone' of params and batch_stats, copied): the
    frozen copy `TrainState.imnet_encoder` and what `model.apply(..., method='encode')`
    needs."""
    variables = {"params": {"backbone": jax.tree.map(jnp.copy, params["backbone"])}}
    if "backbone" in batch_stats:
        variables["batch_stats"] = {"backbone": jax.tree.map(jnp.copy, batch_stats["backbone"])}
    return variables
