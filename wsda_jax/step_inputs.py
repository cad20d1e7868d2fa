"""What the train steps read: their random streams and the device batch (docs/method.md
§4, 12).

The keys derive from the state (`step_key`: base key, step, device index); each
stream is independent of the others (a split of the step key, or a fold_in with a
constant of its own). The images
arrive as uint8 crops and leave colour-jittered and ImageNet-normalised; the labels
leave as int32; the target's weak label map and presence vector are those of the
augmented crop (`target_weak_labels`). `adapt_inputs` gathers them for the adaptation
step, `input_images` is also the source-only step's input.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from wsda_jax import augment, classes, config_lib, label_ops
from wsda_jax.train_state import TrainState

Batch = dict[str, Any]
# The adapt step's random streams, split in this order from `step_key`.
ADAPT_KEYS = ("jitter_s", "jitter_t", "edge", "inter", "intra_src", "intra_tgt", "mix")
# Streams beyond ADAPT_KEYS are fold_in(step key, n) with n >= len(ADAPT_KEYS), so that
# switching one on leaves the others (and the reference's runs) unchanged. n must not be
# below len(ADAPT_KEYS): under JAX's partitionable threefry (the default),
# fold_in(key, n) equals split(key, m)[n] for every m > n, the stream ADAPT_KEYS[n].
MIC_STREAM = len(ADAPT_KEYS)  # Masked image consistency.
# The student's dropout and drop path (DAFormer): fold_in(step key, DROPOUT_STREAM), then
# one key per student forward pass, named by STUDENT_PASSES (DeepLabV2 draws none).
DROPOUT_STREAM = len(ADAPT_KEYS) + 1
STUDENT_PASSES = ("target", "source", "mixed", "masked")


def step_key(state: TrainState, axis_name: str) -> jax.Array:
    """The step's PRNG key: base key folded with the step, then with the device index."""
    key = jax.random.fold_in(state.rng, state.step)
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def adapt_keys(state: TrainState, axis_name: str) -> dict[str, jax.Array]:
    """The adaptation step's keys, named by ADAPT_KEYS: `step_key` split in that order."""
    keys = jax.random.split(step_key(state, axis_name), len(ADAPT_KEYS))
    return dict(zip(ADAPT_KEYS, keys, strict=True))


def mic_key(state: TrainState, axis_name: str) -> jax.Array:
    """This device's key for masked image consistency: `step_key` folded with MIC_STREAM."""
    return jax.random.fold_in(step_key(state, axis_name), MIC_STREAM)


def dropout_keys(state: TrainState, axis_name: str) -> dict[str, jax.Array]:
    """This device's dropout keys of the student's forward passes, named by STUDENT_PASSES:
    `step_key` folded with DROPOUT_STREAM, then split."""
    key = jax.random.fold_in(step_key(state, axis_name), DROPOUT_STREAM)
    keys = jax.random.split(key, len(STUDENT_PASSES))
    return dict(zip(STUDENT_PASSES, keys, strict=True))


def input_images(key: jax.Array, images: jax.Array, config: ml_collections.ConfigDict):
    """uint8 [B, H, W, 3] crops from the pipeline -> colour-jittered (config.data.jitter,
    docs/method.md §12), ImageNet-normalised float32 [B, H, W, 3]."""
    return augment.normalize(augment.color_jitter(key, images, config.data.jitter))


def target_weak_labels(
    target: Batch, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """The step's weak label map and presence vector from the target batch (§4).

    `target['weak_label']` is the augmented crop of the weak label map: gtCoarse for
    'coarse' and 'image', the points for 'point'. With config.presence == 'crop'
    (faithful default) the presence vector is the set of classes in that crop, as the
    reference computes it every step; with 'image' it is the record's whole-image
    presence (true image-level tags, `target['presence']`). For 'image' the weak label
    map is then all 255: only the presence vector carries information.

    Returns (weak_label int32 [B, H, W], presence float32 [B, C]).
    """
    crop = target["weak_label"].astype(jnp.int32)
    if config.presence == "crop":
        presence = label_ops.presence(crop, config.num_classes)
    else:
        presence = target["presence"].astype(jnp.float32)
    if not config_lib.has_label_map(config.weak_label):
        crop = jnp.full_like(crop, classes.IGNORE_LABEL)
    return crop, presence


class AdaptInputs(NamedTuple):
    """The device batch as the adaptation step uses it.

    source_image, target_image: float32 [B, H, W, 3], ImageNet-normalised.
    source_label, weak_label: int32 [B, H, W] (255 = ignore); presence: float32 [B, C].
    """

    source_image: jax.Array
    source_label: jax.Array
    target_image: jax.Array
    weak_label: jax.Array
    presence: jax.Array


def adapt_inputs(
    batch: Batch, keys: dict[str, jax.Array], config: ml_collections.ConfigDict
) -> AdaptInputs:
    """Colour-jittered (keys 'jitter_s', 'jitter_t'), normalised images, int32 labels and
    this step's weak labels and presence."""
    weak_label, presence = target_weak_labels(batch["target"], config)
    return AdaptInputs(
        source_image=input_images(keys["jitter_s"], batch["source"]["image"], config),
        source_label=batch["source"]["label"].astype(jnp.int32),
        target_image=input_images(keys["jitter_t"], batch["target"]["image"], config),
        weak_label=weak_label,
        presence=presence,
    )
