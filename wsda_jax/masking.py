"""Masked image consistency (MIC, Hoyer et al., CVPR 2023): an option beyond the reference.

The student also sees the target image, strongly augmented (colour jitter and blur, as
the ClassMix input of docs/method.md § 10) and with random square blocks masked out,
and learns the teacher's pseudo labels of the unmasked image with their confidence
weight (the ClassMix weight of section 4.6), so it must infer the masked regions from
context. Off by default (`config.mic.enabled`); the loss weight is `config.loss.mic`.
Runs on the device inside the adaptation step, each device with its own key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from wsda_jax import augment, losses


def mask_grid_shape(height: int, width: int, block_size: int) -> tuple[int, int]:
    """Blocks per column and row: round(side / block_size), at least 1 (MIC's grid)."""
    return max(1, round(height / block_size)), max(1, round(width / block_size))


def block_mask(
    key: jax.Array, batch: int, height: int, width: int, block_size: int, mask_ratio: float
) -> jax.Array:
    """Random block mask: bool [batch, height, width], True where the image is kept.

    Each cell of a `mask_grid_shape` grid is kept when a uniform draw exceeds
    `mask_ratio` (so about that fraction is masked), and the grid is resized to the
    image by nearest neighbour: pixel (y, x) takes cell (floor(y * gh / H),
    floor(x * gw / W)).
    """
    grid_h, grid_w = mask_grid_shape(height, width, block_size)
    keep = jax.random.uniform(key, (batch, grid_h, grid_w)) > mask_ratio
    rows = (jnp.arange(height) * grid_h) // height
    cols = (jnp.arange(width) * grid_w) // width
    return keep[:, rows][:, :, cols]


class MaskedBatch(NamedTuple):
    """The student's masked target input.

    image: float32 [B, H, W, 3], normalised, 0 (the mean colour) in masked blocks.
    label: int32 [B, H, W], the teacher's pseudo label of the unmasked image.
    weight: float32 [B, H, W], its confidence weight.
    keep: bool [B, H, W], True where the image is kept.
    """

    image: jax.Array
    label: jax.Array
    weight: jax.Array
    keep: jax.Array


def mic_loss(logits: jax.Array, masked: MaskedBatch) -> jax.Array:
    """The unweighted MIC term: the student's float [B, H, W, C] logits on `masked.image`
    against the pseudo label with its confidence weight (`losses.cross_entropy`: sum of
    weight x CE over labelled pixels / their count, as the ClassMix term)."""
    return losses.cross_entropy(logits, masked.label, masked.weight)


def masked_batch(
    key: jax.Array,
    target_image: jax.Array,
    pseudo_label: jax.Array,
    pseudo_weight: jax.Array,
    config: ml_collections.ConfigDict,
) -> MaskedBatch:
    """The student's masked target input and its labels (MIC's 'separatetrgaug' mode).

    Args:
      key: this device's PRNG key for the augmentation and the mask.
      target_image: float32 [B, H, W, 3], ImageNet-normalised (the teacher's input).
      pseudo_label: int32 [B, H, W], the teacher's pseudo label of the unmasked image.
      pseudo_weight: float32 [B, H, W], its confidence weight.
    Returns:
      image = strong_augment(target) * keep in normalised space (masked pixels are 0,
      the mean colour, as MIC multiplies the normalised image); label and weight are
      the pseudo label and weight unchanged.
    """
    aug_key, mask_key = jax.random.split(key)
    augmented = augment.strong_augment_normalized(aug_key, target_image, config.classmix)
    batch, height, width, _ = target_image.shape
    keep = block_mask(mask_key, batch, height, width, config.mic.block_size, config.mic.mask_ratio)
    image = augmented * keep[..., None].astype(jnp.float32)
    return MaskedBatch(image=image, label=pseudo_label, weight=pseudo_weight, keep=keep)
