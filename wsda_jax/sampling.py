"""Fixed-shape hard-anchor sampling for the contrastive losses (docs/method.md §8).

The reference loops over images and classes with `unique`/`nonzero` (dynamic shapes,
host round trips). Here every (image b, class c) pair owns `max_views` slots and
every pixel gets a random priority: hard pixels of class c (label == c, pred != c)
rank above easy ones (label == c, pred == c, prob > easy_threshold), which rank
above everything else; within a tier the priority is uniform random. `top_k` of
size `max_views` per pair then lists, in order, the hard pixels in random order
followed by the easy ones in random order, so its first `n_view` entries are
exactly the reference's choice: `n_view` random hard pixels if there are enough,
otherwise all hard pixels plus random easy ones. Slot r of a pair is valid iff
`r < n_view`, the pair is eligible (more than `max_views` pixels of c) and it has
at least `n_view` candidates.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from wsda_jax import label_ops


@flax.struct.dataclass
class AnchorSample:
    """Sampled anchor slots, flattened over (image b, class c, rank r) to `[B * C * max_views]`.

    index: int32 flat pixel index into the `B * h * w` pixels (b * h * w + y * w + x).
    label: int32 class c of the slot.
    valid: bool, whether the slot holds a sampled anchor.
    """

    index: jax.Array
    label: jax.Array
    valid: jax.Array


def views_per_pair(eligible: jax.Array, *, max_views: int, max_samples: int) -> jax.Array:
    """`n_view = min(max_samples // total_eligible, max_views)`, 0 when nothing is eligible.

    eligible: bool `[B, C]` (image, class) eligibility; the total spans the whole batch.
    Returns an int32 scalar.
    """
    total = jnp.sum(eligible.astype(jnp.int32))
    n_view = jnp.minimum(max_samples // jnp.maximum(total, 1), max_views)
    return jnp.where(total > 0, n_view, 0).astype(jnp.int32)


def sample_anchors(
    key: jax.Array,
    label: jax.Array,
    pred: jax.Array,
    prob: jax.Array,
    *,
    num_classes: int,
    max_views: int = 20,
    max_samples: int = 256,
    easy_threshold: float = 0.96,
) -> AnchorSample:
    """Samples up to `n_view` anchors per eligible (image, class) pair, hard before easy.

    Args:
      key: PRNG key; the choice is a deterministic function of it.
      label: int `[B, h, w]` class per pixel, 255 = ignore.
      pred: int `[B, h, w]` predicted class (any value outside [0, C) counts as wrong).
      prob: float `[B, h, w]` confidence of `pred`.
      num_classes: C.
      max_views: slots per pair; a class is eligible in an image if it has more pixels.
      max_samples: anchor budget shared by all eligible pairs of the batch.
      easy_threshold: a correctly predicted pixel is easy only if `prob` exceeds it.

    Returns:
      AnchorSample with arrays of shape `[B * C * max_views]`.
    """
    for name, x in (("label", label), ("pred", pred), ("prob", prob)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be [B, h, w], got shape {x.shape}")
    if pred.shape != label.shape or prob.shape != label.shape:
        raise ValueError(
            f"label {label.shape}, pred {pred.shape} and prob {prob.shape} must have one shape"
        )
    batch, height, width = label.shape
    num_pixels = height * width
    if not 1 <= max_views <= num_pixels:
        raise ValueError(f"max_views={max_views} must be in [1, h * w = {num_pixels}]")
    if max_samples < 1:
        raise ValueError(f"max_samples={max_samples} must be positive")
    label_ops.check_label_values(label, num_classes, "label")

    label = label.reshape(batch, num_pixels).astype(jnp.int32)
    pred = pred.reshape(batch, num_pixels).astype(jnp.int32)
    prob = prob.reshape(batch, num_pixels).astype(jnp.float32)
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    is_class = label[:, None, :] == classes[None, :, None]  # [B, C, hw]
    correct = (pred == label)[:, None, :]
    hard = is_class & ~correct
    easy = is_class & correct & (prob > easy_threshold)[:, None, :]

    count = jnp.sum(is_class, axis=-1, dtype=jnp.int32)  # [B, C]
    candidates = jnp.sum(hard | easy, axis=-1, dtype=jnp.int32)
    eligible = count > max_views
    n_view = views_per_pair(eligible, max_views=max_views, max_samples=max_samples)
    pair_ok = eligible & (candidates >= n_view)

    # One uniform number per pixel suffices: a pixel is a candidate of one class only.
    noise = jax.random.uniform(key, (batch, 1, num_pixels), dtype=jnp.float32)
    priority = jnp.where(hard, 2.0 + noise, jnp.where(easy, 1.0 + noise, -1.0))
    _, pixel = jax.lax.top_k(priority, max_views)  # [B, C, max_views]

    rank = jnp.arange(max_views, dtype=jnp.int32)
    valid = pair_ok[:, :, None] & (rank[None, None, :] < n_view)
    image = jnp.arange(batch, dtype=jnp.int32)[:, None, None]
    index = image * num_pixels + pixel.astype(jnp.int32)
    slot_label = jnp.broadcast_to(classes[None, :, None], valid.shape)
    return AnchorSample(
        index=index.reshape(-1), label=slot_label.reshape(-1), valid=valid.reshape(-1)
    )
