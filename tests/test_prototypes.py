"""Tests of wsda_jax.prototypes.update_prototypes (under jax.jit) against the NumPy loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from wsda_jax import label_ops, prototypes

C, D = 5, 6


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed, batch=2, size=8):
    rng = np.random.default_rng(seed)
    previous = rng.normal(size=(C, D)).astype(np.float32)
    # Features in one half-space so that w_i = F_i . m_c stays away from 0.
    features = _unit(rng.normal(size=(batch, size, size, D)) + 2.0).astype(np.float32)
    center = rng.integers(0, 3, size=(batch, size, size)).astype(np.int32)  # classes 0-2
    center[rng.random(center.shape) < 0.3] = 255
    member = rng.integers(0, 4, size=(batch, size, size)).astype(np.int32)
    member[member == 2] = 255  # class 2: in center, no member pixel
    return previous, features, center, member


@pytest.fixture(scope="session")
def update():
    return jax.jit(prototypes.update_prototypes)


def test_update_matches_reference_and_keeps_absent_classes(update):
    previous, features, center, member = _inputs(0)
    got = np.asarray(update(previous, features, center, member))
    np.testing.assert_allclose(
        got, ref.update_prototypes(previous, features, center, member), rtol=1e-5, atol=1e-6
    )
    # Class 2 has no member pixel, classes 3 and 4 are absent from center: unchanged.
    np.testing.assert_array_equal(got[2:], previous[2:])
    assert not np.allclose(got[:2], previous[:2])


def test_point_labels_take_means_of_upsampled_features(update):
    previous, features, _, member = _inputs(1)
    # Point labels at full resolution (4x), none on a pixel that nearest downsampling
    # keeps, so the class means must come from the upsampled features.
    points = np.full((2, 32, 32), 255, np.int32)
    points[0, 5, 9], points[1, 30, 2], points[1, 17, 21] = 0, 1, 3
    got = np.asarray(update(previous, features, points, member))
    # Independent of jax.image.resize: NumPy bilinear upsampling, half-pixel centres.
    big = ref.bilinear_resize(np.asarray(features), 32, 32)
    expected = ref.update_prototypes(previous, features, points, member, center_features=big)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The points are gone after downsampling the label, so the plain path updates nothing.
    assert np.all(label_ops.resize_nearest(points, (8, 8)) == 255)
    np.testing.assert_array_equal(
        update(previous, features, label_ops.resize_nearest(points, (8, 8)), member), previous
    )


def test_psum_over_devices_equals_the_global_batch(update):
    previous, features, center, member = _inputs(2, batch=4)
    split = lambda x: x.reshape(2, 2, *x.shape[1:])  # 2 "devices" of 2 images
    per_device = jax.jit(
        jax.vmap(
            functools.partial(prototypes.update_prototypes, axis_name="data"),
            in_axes=(None, 0, 0, 0),
            axis_name="data",
        )
    )(previous, split(features), split(center), split(member))
    expected = update(previous, features, center, member)
    for device in range(2):
        np.testing.assert_allclose(per_device[device], expected, rtol=1e-5, atol=1e-6)


def test_no_gradient_flows_through_the_update():
    previous, features, center, member = _inputs(3)

    def total(p, f):
        return jnp.sum(prototypes.update_prototypes(p, f, center, member) ** 2)

    grad_p, grad_f = jax.jit(jax.grad(total, argnums=(0, 1)))(previous, features)
    assert not np.any(grad_p) and not np.any(grad_f)


def test_bad_inputs_raise():
    previous, features, center, member = _inputs(4)
    with pytest.raises(ValueError, match="member"):
        prototypes.update_prototypes(previous, features, center, member[:, :4])
    with pytest.raises(ValueError, match="center"):
        prototypes.update_prototypes(previous, features, center[:, :4], member)
    with pytest.raises(ValueError, match="features"):
        prototypes.update_prototypes(previous, features[..., :3], center, member)
    with pytest.raises(ValueError, match="center has values"):
        prototypes.update_prototypes(previous, features, np.full_like(center, 9), member)


def test_source_and_target_label_choices_per_weak_label_kind():
    """docs/method.md §7, written out with the NumPy reference: source: center = member =
    the source labels at feature resolution; coarse: center = the weak map at feature
    resolution, member = fuse(confident pseudo label, weak map); point: the same member,
    the class means over the points of the upsampled features; image / none: center =
    member = the confident pseudo label."""
    previous, features, pseudo, _ = _inputs(2)
    rng = np.random.default_rng(3)
    source = rng.integers(0, C, size=(2, 32, 32)).astype(np.int32)
    weak = np.full((2, 32, 32), 255, np.int32)
    weak[:, :16, :16] = 3
    weak[0, 5, 9], weak[1, 30, 2] = 0, 1
    check = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    low = ref.resize_nearest(source, (8, 8))
    got = jax.jit(prototypes.update_source_prototypes)(previous, features, source)
    check(got, ref.update_prototypes(previous, features, low, low))
    target = jax.jit(prototypes.update_target_prototypes, static_argnames="weak_label_kind")
    member = ref.fuse(pseudo, weak)
    expected = {
        "coarse": ref.update_prototypes(
            previous, features, ref.resize_nearest(weak, (8, 8)), member
        ),
        "point": ref.update_prototypes(
            previous,
            features,
            weak,
            member,
            center_features=ref.bilinear_resize(features, 32, 32),
        ),
        "image": ref.update_prototypes(previous, features, pseudo, pseudo),
        "none": ref.update_prototypes(previous, features, pseudo, pseudo),
    }
    for kind, want in expected.items():
        got = target(previous, features, pseudo, weak, weak_label_kind=kind)
        check(got, want, err_msg=kind)
    assert not np.allclose(expected["coarse"], expected["point"])
    assert not np.allclose(expected["coarse"], expected["image"])
