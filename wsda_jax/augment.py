"""On-device image operations of the train step: colour jitter, normalisation, ClassMix,
strong augmentation, and the student's mixed input built from them (`mixed_batch`).

Everything here is jittable with fixed shapes (docs/method.md §1, 10 and 12), so the
photometric part of the data augmentation and the whole ClassMix + augmentation
pipeline run inside the compiled step; the host does only the geometric part
(scale, crop, flip: `data/transforms.py`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Label ids are bytes (train ids 0..C-1 and 255 = ignore): a presence vector over all 256
# ids keeps the "unique labels of the batch, 255 included" rule fixed-shape.
NUM_LABEL_IDS = 256


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# RGB <-> YIQ: a hue shift is a rotation of the chroma plane (I, Q).
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def hue_matrix(shift: jax.Array) -> jax.Array:
    """float32 [3, 3] RGB matrix rotating the hue by `shift` turns (1 = 360 degrees)."""
    c, s = jnp.cos(2 * jnp.pi * shift), jnp.sin(2 * jnp.pi * shift)
    rotation = jnp.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], jnp.float32)
    return jnp.asarray(_YIQ_TO_RGB) @ rotation @ jnp.asarray(_RGB_TO_YIQ)


class JitterDraw(NamedTuple):
    """The random part of one colour jitter: `order` int32 [4], a permutation of the ops
    (0 brightness, 1 contrast, 2 saturation, 3 hue); `factors` float32 [3] for ops 0-2,
    each ~ U(max(0, 1 - s), 1 + s); `hue_shift` float32 [] ~ U(-s, s) turns."""

    order: jax.Array
    factors: jax.Array
    hue_shift: jax.Array


def jitter_draw(key: jax.Array, strength: float) -> JitterDraw:
    """One torchvision ColorJitter(s, s, s, s) draw, ops in a random order."""
    k_order, k_factors, k_hue = jax.random.split(key, 3)
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    return JitterDraw(
        order=jax.random.permutation(k_order, 4),
        factors=jax.random.uniform(k_factors, (3,), minval=low, maxval=high),
        hue_shift=jax.random.uniform(k_hue, (), minval=-strength, maxval=strength),
    )


def jitter_affine(draw: JitterDraw, mean: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The draw's four ops composed in its order into one RGB map x -> A x + o.

    Every op is affine in RGB: brightness scales; contrast blends with the image's mean
    grey level (computed from `mean`, the float32 [3] mean colour of the input, pushed
    through the ops before it); saturation blends with each pixel's grey level; hue
    rotates the YIQ chroma plane. Returns (A float32 [3, 3], o float32 [3]).
    """
    luma = jnp.asarray(_LUMA)
    f_brightness, f_contrast, f_saturation = draw.factors

    def brightness(a, o):
        return f_brightness * a, f_brightness * o

    def contrast(a, o):
        grey = luma @ (a @ mean + o)
        return f_contrast * a, f_contrast * o + (1 - f_contrast) * grey

    def saturation(a, o):
        m = f_saturation * jnp.eye(3) + (1 - f_saturation) * jnp.outer(jnp.ones(3), luma)
        return m @ a, m @ o

    def hue(a, o):
        m = hue_matrix(draw.hue_shift)
        return m @ a, m @ o

    affine = (jnp.eye(3), jnp.zeros(3))
    for position in range(4):
        affine = jax.lax.switch(
            draw.order[position], (brightness, contrast, saturation, hue), *affine
        )
    return affine


def color_jitter(key: jax.Array, images: jax.Array, strength: float) -> jax.Array:
    """The training batches' colour jitter (docs/method.md §12), one draw per image.

    torchvision's ColorJitter(s, s, s, s) semantics (factors and op order drawn per
    image), with the four ops composed into one affine map and clipped once at the end
    (torchvision clips after every op; they differ only where an intermediate op
    saturates). Runs in the step, so its draws come from the step's key and resumption
    replays them exactly.

    Args:
      key: PRNG key.
      images: uint8 or float32 [B, H, W, 3] on a 0..255 scale.
      strength: s >= 0; 0 returns the images unchanged (as float32).
    Returns:
      float32 [B, H, W, 3] in 0..255 (not rounded to integers).
    """
    images = images.astype(jnp.float32)
    if strength == 0:
        return images
    draws = jax.vmap(functools.partial(jitter_draw, strength=strength))(
        jax.random.split(key, images.shape[0])
    )
    a, o = jax.vmap(jitter_affine)(draws, images.mean(axis=(1, 2)))
    out = jnp.einsum("bhwc,bdc->bhwd", images, a, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(out + o[:, None, None, :], 0.0, 255.0)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 or float [..., 3] in 0..255 -> float32 [..., 3], ImageNet mean/std on a 0..1
    scale."""
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
    """ClassMix of source pixels into target images (docs/method.md §10).

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
    """Random colour jitter and Gaussian blur (docs/method.md §10).

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


def strong_augment_normalized(
    key: jax.Array, images: jax.Array, classmix_config: ml_collections.ConfigDict
) -> jax.Array:
    """`strong_augment` with the settings of `config.classmix`, on ImageNet-normalised float32
    [B, H, W, 3] images in and out (the ClassMix input and the masked MIC input)."""
    augmented = strong_augment(
        key,
        denormalize(images),
        jitter_prob=classmix_config.jitter_prob,
        jitter_strength=classmix_config.jitter_strength,
        blur_prob=classmix_config.blur_prob,
        blur_sigma=tuple(classmix_config.blur_sigma),
        per_image_decisions=classmix_config.per_image_augment,
    )
    return normalize(augmented * 255.0)


def mixed_batch(
    key: jax.Array,
    source_image: jax.Array,
    source_label: jax.Array,
    target_image: jax.Array,
    pseudo_label: jax.Array,
    pseudo_weight: jax.Array,
    classmix_config: ml_collections.ConfigDict,
) -> MixedBatch:
    """The student's mixed input (§10): ClassMix (or, with `classmix_config.enabled` off,
    the target alone), then strong augmentation.

    Images are float32 [B, H, W, 3] normalised; labels int32 [B, H, W]; pseudo_weight
    float32 [B, H, W] (the teacher's ClassMix weight). Returns the normalised mixed
    image, its int32 label (source / pseudo label) and float32 pixel weight.
    """
    mix_key, aug_key = jax.random.split(key)
    if classmix_config.enabled:
        mixed = classmix(
            mix_key,
            source_image,
            source_label,
            target_image,
            pseudo_label,
            pseudo_weight,
            per_image=classmix_config.per_image,
        )
    else:
        mixed = MixedBatch(
            image=target_image,
            label=pseudo_label,
            weight=pseudo_weight,
            mask=jnp.zeros(pseudo_label.shape, bool),
        )
    return mixed._replace(image=strong_augment_normalized(aug_key, mixed.image, classmix_config))
