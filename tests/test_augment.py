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


# Jitted once per setting: op by op, each call would compile every primitive it uses.
strong_augment = jax.jit(
    augment.strong_augment,
    static_argnames=("jitter_prob", "jitter_strength", "blur_prob", "blur_sigma",
                     "per_image_decisions"),
)  # fmt: skip
color_jitter = jax.jit(augment.color_jitter, static_argnums=2)


def test_strong_augment_shape_range_determinism():
    key = jax.random.PRNGKey(0)
    images = jax.random.uniform(key, (4, 32, 32, 3))
    aug = strong_augment
    out1 = aug(jax.random.PRNGKey(3), images)
    out2 = aug(jax.random.PRNGKey(3), images)
    out3 = aug(jax.random.PRNGKey(4), images)
    assert out1.shape == images.shape and out1.dtype == jnp.float32
    assert float(out1.min()) >= 0.0 and float(out1.max()) <= 1.0
    np.testing.assert_array_equal(out1, out2)
    assert not np.allclose(out1, out3)
    # With both probabilities 0 the images pass through unchanged.
    same = strong_augment(key, images, jitter_prob=0.0, blur_prob=0.0)
    np.testing.assert_allclose(same, images, atol=1e-6)
    # Blur only: a constant image stays constant (reflect padding, normalised kernel),
    # a checkerboard loses contrast.
    const = jnp.full((1, 32, 32, 3), 0.3)
    np.testing.assert_allclose(
        strong_augment(key, const, jitter_prob=0.0, blur_prob=1.0), const, atol=1e-5
    )
    board = (jnp.indices((32, 32)).sum(0) % 2).astype(jnp.float32)[None, ..., None]
    board = jnp.broadcast_to(board, (1, 32, 32, 3))
    blurred = strong_augment(key, board, jitter_prob=0.0, blur_prob=1.0)
    assert float(blurred.std()) < 0.8 * float(board.std())


def test_blur_kernel_size_is_odd_and_about_ten_percent():
    assert augment.blur_kernel_size(512, 512) == 53
    assert augment.blur_kernel_size(32, 64) == 5
    assert augment.blur_kernel_size(8, 8) == 3


def _changed_per_image(key, images, per_image_decisions):
    out = strong_augment(
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


def _sequential_jitter(image, draw):
    """Float64 reference of one colour jitter: the ops one after another on the pixels,
    in the draw's order, without clipping (torchvision's definition of each op)."""
    luma = np.array([0.299, 0.587, 0.114])
    x = image.astype(np.float64)
    f_brightness, f_contrast, f_saturation = np.asarray(draw.factors, np.float64)
    for op in np.asarray(draw.order):
        if op == 0:
            x = x * f_brightness
        elif op == 1:
            grey = (x @ luma).mean()
            x = (x - grey) * f_contrast + grey
        elif op == 2:
            grey = (x @ luma)[..., None]
            x = (x - grey) * f_saturation + grey
        else:
            x = x @ np.asarray(augment.hue_matrix(draw.hue_shift), np.float64).T
    return x


def test_color_jitter_equals_the_sequential_ops_in_the_drawn_order():
    images = jax.random.randint(jax.random.key(0), (6, 16, 16, 3), 90, 160).astype(jnp.uint8)
    key = jax.random.key(3)
    out = np.asarray(color_jitter(key, images, 0.25))
    draws = jax.vmap(lambda k: augment.jitter_draw(k, 0.25))(jax.random.split(key, 6))
    for i in range(6):
        draw = jax.tree.map(lambda x, i=i: x[i], draws)
        expected = _sequential_jitter(np.asarray(images[i]), draw)
        assert expected.min() > 0 and expected.max() < 255  # no clipping involved
        np.testing.assert_allclose(out[i], expected, atol=1e-3)
    assert len({tuple(np.asarray(o)) for o in draws.order}) > 1  # orders differ per image
    np.testing.assert_array_equal(color_jitter(key, images, 0.0), images)


def test_color_jitter_draws_have_torchvision_distributions():
    """Factors ~ U(0.75, 1.25), hue shift ~ U(-0.25, 0.25), all 24 op orders equally likely."""
    n = 4800
    draws = jax.vmap(lambda k: augment.jitter_draw(k, 0.25))(jax.random.split(jax.random.key(0), n))
    factors, shifts = np.asarray(draws.factors), np.asarray(draws.hue_shift)
    assert factors.min() >= 0.75 and factors.max() <= 1.25
    for column in factors.T:  # uniform: mean 1, quartiles at 0.875 / 1.125
        assert abs(column.mean() - 1.0) < 0.01
        np.testing.assert_allclose(np.quantile(column, [0.25, 0.75]), [0.875, 1.125], atol=0.015)
    assert abs(shifts.mean()) < 0.01 and shifts.min() >= -0.25 and shifts.max() <= 0.25
    np.testing.assert_allclose(np.quantile(shifts, [0.25, 0.75]), [-0.125, 0.125], atol=0.015)
    orders, counts = np.unique(np.asarray(draws.order), axis=0, return_counts=True)
    assert len(orders) == 24 and counts.min() > 0.6 * n / 24 and counts.max() < 1.4 * n / 24


def test_color_jitter_clips_and_keeps_grey_under_hue_and_saturation():
    grey = jnp.full((1, 4, 4, 3), 120, jnp.uint8)
    out = color_jitter(jax.random.key(1), grey, 0.25)
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)  # still grey
    bright = jnp.full((8, 4, 4, 3), 250, jnp.uint8)
    out = color_jitter(jax.random.key(2), bright, 0.25)
    assert float(out.max()) <= 255.0 and float(out.min()) >= 0.0


def test_hue_rotation_keeps_grey_and_full_turn_is_identity():
    rotate = np.asarray(augment.hue_matrix(0.25))
    grey = np.array([120.0, 120.0, 120.0], np.float32)
    np.testing.assert_allclose(rotate @ grey, grey, atol=1e-3)
    red = np.array([200.0, 30.0, 30.0], np.float32)
    assert np.abs(rotate @ red - red).max() > 50
    np.testing.assert_allclose(augment.hue_matrix(1.0), np.eye(3), atol=1e-5)
    np.testing.assert_allclose(
        augment.hue_matrix(0.1) @ augment.hue_matrix(-0.1), np.eye(3), atol=1e-5
    )
