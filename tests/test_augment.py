"""Tests of wsda_jax.augment: normalisation, the ClassMix rule, strong augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsda_jax import augment


def test_normalize_denormalize_round_trip():
    images = jax.random.randint(jax.random.PRNGKey(0), (2, 8, 8, 3), 0, 256).astype(jnp.uint8)
    x = augment.normalize(images)
    assert x.dtype == jnp.float32
    # Pure white: (1 - mean) / std.
    white = augment.normalize(jnp.full((1, 1, 1, 3), 255, jnp.uint8))[0, 0, 0]
    np.testing.assert_allclose(
        white, (1 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD), rtol=1e-6
    )
    np.testing.assert_allclose(augment.denormalize(x) * 255.0, images, atol=1e-3)


def _classmix_inputs(key, batch=3, size=8, ids=(0, 1, 2, 5, 255)):
    k1, k2 = jax.random.split(key)
    source_label = jax.random.choice(k1, jnp.asarray(ids, jnp.int32), (batch, size, size))
    source_image = jnp.ones((batch, size, size, 3))
    target_image = -jnp.ones((batch, size, size, 3))
    pseudo_label = jnp.full((batch, size, size), 7, jnp.int32)
    pseudo_weight = jax.random.uniform(k2, (batch, size, size)) * 0.5
    return source_image, source_label, target_image, pseudo_label, pseudo_weight


@pytest.mark.parametrize("per_image", [False, True])
def test_classmix_rule(per_image):
    inputs = _classmix_inputs(jax.random.PRNGKey(1))
    source_image, source_label, target_image, pseudo_label, pseudo_weight = inputs
    source_label = np.array(source_label)
    # Image 0 lacks class 5 so the batch-level and per-image id sets differ.
    source_label[0][source_label[0] == 5] = 0
    seen = set()
    for seed in range(8):
        mixed = jax.jit(augment.classmix, static_argnames="per_image")(
            jax.random.PRNGKey(seed),
            source_image,
            jnp.asarray(source_label),
            target_image,
            pseudo_label,
            pseudo_weight,
            per_image=per_image,
        )
        batch_ids = set(np.unique(source_label).tolist())
        for i in range(source_label.shape[0]):
            ids = set(np.unique(source_label[i]).tolist()) if per_image else batch_ids
            mask = np.asarray(mixed.mask[i])
            chosen = set(np.unique(source_label[i][mask]).tolist())
            # Every chosen id is pasted wholly: no pixel of a chosen id is left out.
            assert not np.isin(source_label[i][~mask], list(chosen)).any()
            if per_image:
                assert len(chosen) == (len(ids) + 1) // 2
            else:
                # Chosen among the batch's ids; ids absent from image i paste nothing.
                assert len(chosen) <= (len(ids) + 1) // 2
            assert chosen <= ids
            seen.add((i, tuple(sorted(chosen))))
            expected_image = np.broadcast_to(np.where(mask, 1.0, -1.0)[..., None], (8, 8, 3))
            np.testing.assert_array_equal(mixed.image[i], expected_image)
            np.testing.assert_array_equal(mixed.label[i], np.where(mask, source_label[i], 7))
            np.testing.assert_allclose(
                mixed.weight[i], np.where(mask, 1.0, np.asarray(pseudo_weight[i]))
            )
    assert len(seen) > 3  # The choice is random across keys.


def test_classmix_default_draws_from_the_whole_batch():
    """Faithful default: ceil(8/2) = 4 of the batch's 8 ids per pair, not per image ids.

    Image 0 holds ids {0, 1}, image 1 ids {2..7}: a per-image draw would always paste
    exactly 1 id into image 0 and 3 into image 1; the batch draw pastes 0, 1 or 2 (of 4
    chosen among 8) into image 0 and 2, 3 or 4 into image 1.
    """
    source_label = np.zeros((2, 8, 8), np.int32)
    source_label[0, :, 4:] = 1
    source_label[1] = np.arange(2, 8)[np.arange(64) % 6].reshape(8, 8)
    inputs = _classmix_inputs(jax.random.PRNGKey(0), batch=2)
    source_image, _, target_image, pseudo_label, pseudo_weight = inputs
    mix = jax.jit(augment.classmix, static_argnames="per_image")
    pasted = {0: set(), 1: set()}
    for seed in range(30):
        for per_image in (False, True):
            mixed = mix(
                jax.random.PRNGKey(seed),
                source_image,
                jnp.asarray(source_label),
                target_image,
                pseudo_label,
                pseudo_weight,
                per_image=per_image,
            )
            for i in range(2):
                n = len(np.unique(source_label[i][np.asarray(mixed.mask[i])]))
                if per_image:
                    assert n == (1, 3)[i]
                else:
                    pasted[i].add(n)
    assert pasted[0] == {0, 1, 2}
    assert pasted[1] == {2, 3, 4}


def test_classmix_batch_draw_counts_ignore_label():
    """Faithful rule: ceil(n/2) of the batch's unique ids, 255 included, per pair."""
    present = jnp.zeros(256, bool).at[jnp.asarray([0, 3, 255])].set(True)
    counts = {}
    for seed in range(40):
        chosen = np.asarray(augment.choose_half(jax.random.PRNGKey(seed), present))
        assert chosen.sum() == 2 and not chosen[~np.asarray(present)].any()
        for i in np.flatnonzero(chosen):
            counts[i] = counts.get(i, 0) + 1
    assert set(counts) == {0, 3, 255}
    assert min(counts.values()) > 15  # Roughly uniform: each expected 40 * 2/3 times.


def test_strong_augment_shape_range_determinism():
    key = jax.random.PRNGKey(0)
    images = jax.random.uniform(key, (4, 32, 32, 3))
    aug = jax.jit(augment.strong_augment)
    out1 = aug(jax.random.PRNGKey(3), images)
    out2 = aug(jax.random.PRNGKey(3), images)
    out3 = aug(jax.random.PRNGKey(4), images)
    assert out1.shape == images.shape and out1.dtype == jnp.float32
    assert float(out1.min()) >= 0.0 and float(out1.max()) <= 1.0
    np.testing.assert_array_equal(out1, out2)
    assert not np.allclose(out1, out3)
    # With both probabilities 0 the images pass through unchanged.
    same = augment.strong_augment(key, images, jitter_prob=0.0, blur_prob=0.0)
    np.testing.assert_allclose(same, images, atol=1e-6)
    # Blur only: a constant image stays constant (reflect padding, normalised kernel),
    # a checkerboard loses contrast.
    const = jnp.full((1, 32, 32, 3), 0.3)
    np.testing.assert_allclose(
        augment.strong_augment(key, const, jitter_prob=0.0, blur_prob=1.0), const, atol=1e-5
    )
    board = (jnp.indices((32, 32)).sum(0) % 2).astype(jnp.float32)[None, ..., None]
    board = jnp.broadcast_to(board, (1, 32, 32, 3))
    blurred = augment.strong_augment(key, board, jitter_prob=0.0, blur_prob=1.0)
    assert float(blurred.std()) < 0.8 * float(board.std())


def test_blur_kernel_size_is_odd_and_about_ten_percent():
    assert augment.blur_kernel_size(512, 512) == 53
    assert augment.blur_kernel_size(32, 64) == 5
    assert augment.blur_kernel_size(8, 8) == 3


def _changed_per_image(key, images, per_image_decisions):
    out = augment.strong_augment(
        key, images, jitter_prob=0.5, blur_prob=0.0, per_image_decisions=per_image_decisions
    )
    return np.abs(np.asarray(out) - np.asarray(images)).reshape(images.shape[0], -1).max(1) > 1e-3


def test_strong_augment_decides_once_per_batch_by_default():
    """The reference draws the jitter and blur decisions once per step for the batch."""
    images = jax.random.uniform(jax.random.key(1), (6, 16, 16, 3), minval=0.2, maxval=0.8)
    batch_rows, image_rows = [], []
    for seed in range(12):
        key = jax.random.key(seed)
        batch_rows.append(_changed_per_image(key, images, per_image_decisions=False))
        image_rows.append(_changed_per_image(key, images, per_image_decisions=True))
    # Per batch: every image jittered or none; both outcomes occur at probability 1/2.
    assert all(row.all() or not row.any() for row in batch_rows)
    assert any(row.all() for row in batch_rows) and any(not row.any() for row in batch_rows)
    # Per image: some batch mixes jittered and plain images.
    assert any(row.any() and not row.all() for row in image_rows)
