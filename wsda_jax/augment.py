"""On-device image operations of the train step: normalisation, ClassMix, strong augmentation.

Everything here is jittable with fixed shapes (METHOD.md sections 1 and 10), so the
whole ClassMix + augmentation pipeline runs inside the compiled step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_LABEL = 255
# Label ids are bytes (train ids 0..C-1 and 255 = ignore): a presence vector over all 256
# ids keeps the "unique labels of the batch, 255 included" rule fixed-shape.
NUM_LABEL_IDS = 256


def normalize(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] in 0..255 -> float32 [..., 3], ImageNet mean/std on a 0..1 scale."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def denormalize(images: jax.Array) -> jax.Array:
    """Inverse of `normalize`: float32 [..., 3] normalised -> float32 [..., 3] on a 0..1 scale."""
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return images.astype(jnp.float32) * std + jnp.asarray(IMAGENET_MEAN, jnp.float32)


class MixedBatch(NamedTuple):
    """Result of `classmix`.

    image: float32 [B, H, W, 3] (same normalisation as the inputs).
    label: int32 [B, H, W], source label where `mask`, pseudo label elsewhere.
    weight: float32 [B, H, W], 1 where `mask`, pseudo-label weight elsewhere.
    mask: bool [B, H, W], the pasted source pixels.
    """

    image: jax.Array
    label: jax.Array
    weight: jax.Array
    mask: jax.Array


def label_presence(labels: jax.Array) -> jax.Array:
    """int [..., H, W] label maps -> bool [..., 256]: which label ids (255 included) occur."""
    ids = jnp.clip(labels, 0, NUM_LABEL_IDS - 1).reshape(*labels.shape[:-2], -1)
    one_hot = ids[..., :, None] == jnp.arange(NUM_LABEL_IDS, dtype=ids.dtype)
    return jnp.any(one_hot, axis=-2)


def choose_half(key: jax.Array, present: jax.Array) -> jax.Array:
    """bool [256] present ids -> bool [256]: ceil(n/2) of the n present ids, uniformly at random.

    A random priority per present id; the ids ranked first are chosen (a uniformly random
    subset of the required size, without replacement, in fixed shape).
    """
    num_present = jnp.sum(present.astype(jnp.int32))
    num_chosen = (num_present + 1) // 2
    priority = jnp.where(present, jax.random.uniform(key, present.shape), -1.0)
    rank = jnp.argsort(jnp.argsort(-priority))  # 0 = highest priority.
    return present & (rank < num_chosen)


def classmix(
    key: jax.Array,
    source_image: jax.Array,
    source_label: jax.Array,
    target_image: jax.Array,
    pseudo_label: jax.Array,
    pseudo_weight: jax.Array,
    *,
    per_image: bool = False,
) -> MixedBatch:
    """ClassMix of source pixels into target images (METHOD.md section 10).

    For each pair i, half (rounded up) of the label ids present in the source labels are
    chosen at random; the source pixels of those ids are pasted onto target image i.
    The faithful default draws the ids from the whole source batch, 255 included (the
    reference's quirk); `per_image=True` draws them from source image i only.

    Args:
      key: PRNG key.
      source_image, target_image: float32 [B, H, W, 3].
      source_label, pseudo_label: int32 [B, H, W] (255 = ignore).
      pseudo_weight: float32 [B, H, W].
      per_image: choose among the ids of each source image instead of the whole batch.
    Returns:
      MixedBatch(image, label, weight, mask).
    """
    batch = source_label.shape[0]
    if per_image:
        present = label_presence(source_label)  # [B, 256]
    else:
        # The ids of the whole (per-device) batch, shared by every pair.
        batch_present = jnp.any(label_presence(source_label), axis=0)  # [256]
        present = jnp.broadcast_to(batch_present, (batch, NUM_LABEL_IDS))
    chosen = jax.vmap(choose_half)(jax.random.split(key, batch), present)  # [B, 256]
    ids = jnp.clip(source_label, 0, NUM_LABEL_IDS - 1)
    mask = jnp.take_along_axis(chosen, ids.reshape(batch, -1), axis=1).reshape(ids.shape)
    image = jnp.where(mask[..., None], source_image, target_image)
    label = jnp.where(mask, source_label, pseudo_label).astype(jnp.int32)
    weight = jnp.where(mask, 1.0, pseudo_weight).astype(jnp.float32)
    return MixedBatch(image=image, label=label, weight=weight, mask=mask)


def blur_kernel_size(height: int, width: int) -> int:
    """Static odd Gaussian kernel size, about 10% of the smaller image side (at least 3)."""
    size = max(3, math.ceil(0.1 * min(height, width)))
    return size if size % 2 else size + 1


def _color_jitter(key: jax.Array, image: jax.Array, strength: float) -> jax.Array:
    """torchvision-style ColorJitter(b, c, s, h = strength) on one [H, W, 3] 0..1 image.

    Brightness, contrast and saturation factors ~ U(1-s, 1+s), hue shift ~ U(-s, s) of the
    hue circle; fixed order (torchvision permutes it), clipped to 0..1 after each op.
    """
    k_b, k_c, k_s, k_h = jax.random.split(key, 4)
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    x = image * jax.random.uniform(k_b, (), minval=low, maxval=high)
    x = jnp.clip(x, 0.0, 1.0)
    x = jnp.clip(pix.random_contrast(k_c, x, low, high), 0.0, 1.0)
    x = jnp.clip(pix.random_saturation(k_s, x, low, high), 0.0, 1.0)
    return jnp.clip(pix.random_hue(k_h, x, strength), 0.0, 1.0)


def _gaussian_blur(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
    """Separable Gaussian blur of one [H, W, 3] image, reflect padding (as kornia)."""
    radius = kernel_size // 2
    padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    return pix.gaussian_blur(padded, sigma, kernel_size, padding="VALID")


def strong_augment(
    key: jax.Array,
    images: jax.Array,
    *,
    jitter_prob: float = 0.8,
    jitter_strength: float = 0.25,
    blur_prob: float = 0.5,
    blur_sigma: tuple[float, float] = (0.15, 1.15),
    per_image_decisions: bool = False,
) -> jax.Array:
    """Random colour jitter and Gaussian blur (METHOD.md section 10).

    Whether to jitter and whether to blur is decided once for the whole batch (the
    reference draws both decisions once per step), or per image with
    `per_image_decisions`; the jitter factors and the blur sigma are drawn per image in
    both cases (the reference applies its transforms image by image).

    Args:
      key: PRNG key; the same key gives the same output.
      images: float32 [B, H, W, 3] on a 0..1 scale (de-normalised).
      jitter_prob: probability of colour jitter.
      jitter_strength: brightness/contrast/saturation/hue strength.
      blur_prob: probability of a Gaussian blur.
      blur_sigma: (low, high) of the uniform blur sigma, in pixels.
      per_image_decisions: decide jitter and blur per image instead of per batch.
    Returns:
      float32 [B, H, W, 3] in 0..1.
    """
    batch, height, width, _ = images.shape
    kernel_size = blur_kernel_size(height, width)
    k_decide_j, k_decide_b, k_images = jax.random.split(key, 3)
    decision_shape = (batch,) if per_image_decisions else ()
    apply_jitter = jnp.broadcast_to(
        jax.random.uniform(k_decide_j, decision_shape) < jitter_prob, (batch,)
    )
    apply_blur = jnp.broadcast_to(
        jax.random.uniform(k_decide_b, decision_shape) < blur_prob, (batch,)
    )

    def one(key, image, jitter, blur):
        k_jitter, k_sigma = jax.random.split(key)
        jittered = _color_jitter(k_jitter, image, jitter_strength)
        image = jnp.where(jitter, jittered, image)
        sigma = jax.random.uniform(k_sigma, (), minval=blur_sigma[0], maxval=blur_sigma[1])
        blurred = _gaussian_blur(image, sigma, kernel_size)
        return jnp.where(blur, blurred, image)

    keys = jax.random.split(k_images, batch)
    augmented = jax.vmap(one)(keys, images.astype(jnp.float32), apply_jitter, apply_blur)
    return jnp.clip(augmented, 0.0, 1.0)
