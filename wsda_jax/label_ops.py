"""Label maps: nearest resizing, prediction/label fusion (docs/method.md §5), presence, argmax.

Label maps are int `[B, H, W]` with 255 = ignore. Resizing follows PyTorch's
`interpolate(mode='nearest')`: output pixel `i` reads source pixel
`floor(i * H_in / H_out)`, so downsampling by 8 takes pixel `(8i, 8j)` and
upsampling repeats each pixel. The source indices are static (they depend only on
shapes), so resizing is a gather with NumPy-computed indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wsda_jax import classes


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index `floor(i * in_size / out_size)` of every output index, `[out_size]` int32.

    Exact integer arithmetic; for the integer ratios used here (8x, 1x) this is
    exactly what PyTorch's float `floor(i * scale)` computes.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    out = np.arange(out_size, dtype=np.int64)
    return np.minimum(out * in_size // out_size, in_size - 1).astype(np.int32)


def check_label_values(
    labels: jax.Array, num_classes: int, name: str, ignore_label: int = classes.IGNORE_LABEL
):
    """Raises ValueError if a concrete label array has values outside [0, C) other than ignore.

    Inside `jax.jit` the array is a tracer and its values are unknown, so the check is
    skipped there (it would need a host round trip); it runs on eager calls only.
    """
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    bad = (values != ignore_label) & ((values < 0) | (values >= num_classes))
    if bad.any():
        raise ValueError(
            f"{name} has values outside [0, {num_classes}) other than {ignore_label}: "
            f"{np.unique(values[bad])[:10].tolist()}"
        )


def _check_rank3(labels: jax.Array, name: str) -> None:
    if labels.ndim != 3:
        raise ValueError(f"{name} must be [B, H, W], got shape {labels.shape}")


def resize_nearest(labels: jax.Array, size: Sequence[int]) -> jax.Array:
    """Resizes label maps `[B, H, W]` (any int dtype) to `[B, h, w]` by nearest neighbour.

    Nearest (never bilinear) because labels are categorical; PyTorch semantics so the
    pixel a downsampled label map keeps is the same as in the reference.
    """
    _check_rank3(labels, "labels")
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size}")
    out_h, out_w = int(size[0]), int(size[1])
    rows = nearest_indices(labels.shape[1], out_h)
    cols = nearest_indices(labels.shape[2], out_w)
    return labels[:, rows][:, :, cols]


def fuse(pred_lowres: jax.Array, label_fullres: jax.Array) -> jax.Array:
    """Merges a low-res prediction `[B, h, w]` with a sparse full-res label `[B, H, W]`.

    Equivalent to: upsample the prediction to `(H, W)` (nearest), overwrite it with
    the label where the label is not 255, downsample the result to `(h, w)` (nearest).
    Downsampling the label first would lose point labels; this order keeps a labelled
    pixel whenever it is the one that the downsampling samples. Implemented as one
    gather per map with composed static indices (no full-resolution intermediate).

    Returns: `[B, h, w]` with the dtype of `label_fullres`.
    """
    _check_rank3(pred_lowres, "pred_lowres")
    _check_rank3(label_fullres, "label_fullres")
    if pred_lowres.shape[0] != label_fullres.shape[0]:
        raise ValueError(
            f"pred_lowres batch {pred_lowres.shape[0]} != label_fullres batch "
            f"{label_fullres.shape[0]}"
        )
    _, h, w = pred_lowres.shape
    _, big_h, big_w = label_fullres.shape
    # Full-res pixels that the final downsampling reads...
    rows_full = nearest_indices(big_h, h)
    cols_full = nearest_indices(big_w, w)
    # ...and the low-res pixels that the upsampling copied into them.
    rows_low = nearest_indices(h, big_h)[rows_full]
    cols_low = nearest_indices(w, big_w)[cols_full]
    label = label_fullres[:, rows_full][:, :, cols_full]
    pred = pred_lowres[:, rows_low][:, :, cols_low].astype(label.dtype)
    return jnp.where(label != classes.IGNORE_LABEL, label, pred)


def presence(labels, num_classes: int):
    """Class-presence vector of each label map: float32 `[B, C]`, 1 where class c labels a pixel.

    The image-level losses' targets (docs/method.md §4): computed per step from the
    augmented crop of the weak label map, as the reference does, and stored with each
    prepared target record (its whole-image presence). Values outside [0, C) (255 =
    ignore) count nothing. A NumPy `labels` gives a NumPy result (data preparation, the
    batch browser; no device involved), a JAX one a JAX result (the step).
    """
    _check_rank3(labels, "labels")
    xp = np if isinstance(labels, np.ndarray) else jnp
    flat = labels.reshape(labels.shape[0], -1)
    hits = flat[:, :, None] == xp.arange(num_classes)  # [B, H*W, C]
    return xp.any(hits, axis=1).astype(xp.float32)


def prediction(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., C] logits -> (int32 argmax [...], float32 max softmax [...]), no gradient."""
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)
