"""Tests of wsda_jax.label_ops against the literal NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from wsda_jax import label_ops


@pytest.mark.parametrize(
    "in_size,out_size",
    [((64, 48), (8, 6)), ((8, 6), (64, 48)), ((10, 7), (4, 3)), ((5, 9), (13, 4))],
)
def test_resize_nearest_matches_reference(in_size, out_size):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 256, size=(2, *in_size)).astype(np.int32)
    resize = jax.jit(functools.partial(label_ops.resize_nearest, size=out_size))
    np.testing.assert_array_equal(resize(labels), ref.resize_nearest(labels, out_size))


def test_downsample_by_8_takes_top_left_pixel_and_upsample_repeats():
    labels = np.arange(2 * 16 * 24, dtype=np.int32).reshape(2, 16, 24)
    down = label_ops.resize_nearest(labels, (2, 3))
    np.testing.assert_array_equal(down, labels[:, ::8, ::8])
    up = label_ops.resize_nearest(down, (16, 24))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(down, 8, axis=1), 8, axis=2))


def test_fuse_matches_reference_and_keeps_sampled_points():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 5, size=(2, 4, 6)).astype(np.int32)
    label = np.full((2, 32, 48), 255, np.int32)
    label[0, 8, 16] = 3  # on the pixel that downsampling by 8 samples: kept
    label[1, 9, 17] = 4  # off it: vanishes
    label[1, :8, :8] = 2  # coarse region covering the sampled pixel (0, 0)
    fused = jax.jit(label_ops.fuse)(pred, label)
    np.testing.assert_array_equal(fused, ref.fuse(pred, label))
    assert fused[0, 1, 2] == 3
    assert fused[1, 1, 2] == pred[1, 1, 2]
    assert fused[1, 0, 0] == 2
    expected = pred.copy()
    expected[0, 1, 2], expected[1, 0, 0] = 3, 2
    np.testing.assert_array_equal(fused, expected)


def test_fuse_with_non_integer_ratio_matches_reference():
    rng = np.random.default_rng(2)
    pred = rng.integers(0, 5, size=(1, 5, 7)).astype(np.int32)
    label = np.where(rng.random((1, 37, 53)) < 0.3, rng.integers(0, 5, (1, 37, 53)), 255)
    np.testing.assert_array_equal(
        label_ops.fuse(pred, label.astype(np.int32)), ref.fuse(pred, label)
    )


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels"):
        label_ops.resize_nearest(jnp.zeros((4, 4), jnp.int32), (2, 2))
    with pytest.raises(ValueError, match="pred_lowres"):
        label_ops.fuse(jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.zeros((1, 8, 8), jnp.int32))
    with pytest.raises(ValueError, match="batch"):
        label_ops.fuse(jnp.zeros((2, 2, 2), jnp.int32), jnp.zeros((1, 8, 8), jnp.int32))
    with pytest.raises(ValueError, match="my_labels"):
        label_ops.check_label_values(jnp.array([0, 3, 255, 7]), 5, "my_labels")
    label_ops.check_label_values(jnp.array([0, 4, 255]), 5, "my_labels")


def test_presence_on_host_and_device():
    """The classes that label a pixel, 255 and out-of-range ids counting nothing: NumPy in,
    NumPy out (data preparation), JAX in, JAX out (the step)."""
    label = np.zeros((40, 60), np.uint8)  # road
    label[:10] = 10  # sky
    label[20:30, 10:40] = 13  # car
    label[35:38, 50:53] = 5  # small pole (9 px)
    label[:, :3] = 255
    label[0, 5] = 19  # An id outside [0, C).
    host = label_ops.presence(label[None], 19)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32 and host.shape == (1, 19)
    np.testing.assert_array_equal(np.flatnonzero(host[0]), [0, 5, 10, 13])
    device = jax.jit(label_ops.presence, static_argnums=1)(jnp.asarray(label[None], jnp.int32), 19)
    assert isinstance(device, jax.Array)
    np.testing.assert_array_equal(device, host)
