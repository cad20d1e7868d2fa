"""Tests of wsda_jax.losses (under jax.jit) against the literal NumPy reference."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
import subprocesses

from wsda_jax import losses, sampling

NUM_CLASSES = 5


def _random_labels(rng, shape, ignore_fraction=0.2):
    labels = rng.integers(0, NUM_CLASSES, size=shape)
    return np.where(rng.random(shape) < ignore_fraction, 255, labels).astype(np.int32)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="session")
def jitted():
    contrastive = {
        cd: jax.jit(functools.partial(losses.pixel_prototype_contrastive_loss, cross_domain=cd))
        for cd in (False, True)
    }
    return {
        "ce": jax.jit(losses.cross_entropy),
        "image": jax.jit(losses.image_level_loss),
        "boundary": jax.jit(losses.boundary_loss),
        "contrastive": contrastive,
    }


# ----------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_matches_reference(jitted):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5, NUM_CLASSES)).astype(np.float32) * 3
    labels = _random_labels(rng, (2, 6, 5))
    weights = rng.random((2, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(
        jitted["ce"](logits, labels), ref.cross_entropy(logits, labels), rtol=1e-5
    )
    np.testing.assert_allclose(
        jitted["ce"](logits, labels, weights), ref.cross_entropy(logits, labels, weights), rtol=1e-5
    )


def test_cross_entropy_all_ignore_is_zero_with_finite_gradient(jitted):
    logits = jnp.ones((1, 4, 4, NUM_CLASSES))
    labels = jnp.full((1, 4, 4), 255, jnp.int32)
    assert float(jitted["ce"](logits, labels)) == 0.0
    grad = jax.jit(jax.grad(losses.cross_entropy))(logits, labels)
    assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_cross_entropy_bad_inputs_raise():
    logits = jnp.zeros((1, 4, 4, NUM_CLASSES))
    with pytest.raises(ValueError, match="labels"):
        losses.cross_entropy(logits, jnp.zeros((1, 4, 5), jnp.int32))
    with pytest.raises(ValueError, match="logits"):
        losses.cross_entropy(jnp.zeros((4, 4, 5)), jnp.zeros((4, 4), jnp.int32))
    with pytest.raises(ValueError, match="weights"):
        losses.cross_entropy(logits, jnp.zeros((1, 4, 4), jnp.int32), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="labels has values"):
        losses.cross_entropy(logits, jnp.full((1, 4, 4), 7, jnp.int32))


# ----------------------------------------------------------------------------- image-level


def test_image_level_loss_matches_reference_and_is_stable(jitted):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 6, NUM_CLASSES)).astype(np.float32) * 4
    presence = (rng.random((3, NUM_CLASSES)) < 0.5).astype(np.float32)
    np.testing.assert_allclose(
        jitted["image"](logits, presence), ref.image_level_loss(logits, presence), rtol=1e-5
    )
    # Saturated sigmoids: the log-sigmoid form stays finite and has the right limit.
    huge = np.full((1, 2, 2, 2), 200.0, np.float32)
    huge[..., 1] = -200.0
    value = float(jitted["image"](huge, np.array([[0.0, 1.0]], np.float32)))
    np.testing.assert_allclose(value, 200.0, rtol=1e-4)
    grad = jax.jit(jax.grad(losses.image_level_loss))(jnp.asarray(huge), jnp.array([[0.0, 1.0]]))
    assert np.all(np.isfinite(grad))
    with pytest.raises(ValueError, match="presence"):
        losses.image_level_loss(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4)))


# ----------------------------------------------------------------------------- boundary


def test_boundary_loss_matches_reference_with_the_same_noise(jitted):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 6, 7, NUM_CLASSES)).astype(np.float32)
    labels = _random_labels(rng, (2, 6, 7))
    key = jax.random.key(3)
    noise = np.asarray(jax.random.gumbel(key, logits.shape, dtype=jnp.float32))
    expected = ref.boundary_loss(logits, labels, noise, tau=0.5)
    np.testing.assert_allclose(jitted["boundary"](logits, labels, key), expected, rtol=1e-4)
    grad = jax.jit(jax.grad(losses.boundary_loss))(jnp.asarray(logits), labels, key)
    assert np.all(np.isfinite(grad)) and np.any(grad)


def test_boundary_loss_all_ignore_is_finite(jitted):
    value = jitted["boundary"](
        jnp.zeros((1, 5, 5, NUM_CLASSES)), jnp.full((1, 5, 5), 255, jnp.int32), jax.random.key(0)
    )
    assert np.isfinite(float(value))


# ----------------------------------------------------------------------------- contrastive


def _contrastive_inputs(seed, num=40, dim=8, valid_fraction=0.7):
    rng = np.random.default_rng(seed)
    anchors = _unit(rng.normal(size=(num, dim))).astype(np.float32)
    prototypes = _unit(rng.normal(size=(NUM_CLASSES, dim))).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=num).astype(np.int32)
    domains = rng.integers(0, 2, size=num).astype(np.int32)
    valid = rng.random(num) < valid_fraction
    # Class 4 only in domain 0: its anchors have no cross-domain positive.
    domains[labels == 4] = 0
    # Garbage labels on invalid slots must not matter.
    labels[~valid] = rng.integers(0, 255, size=(~valid).sum())
    return anchors, labels, domains, valid, prototypes


@pytest.mark.parametrize("cross_domain", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_loss_equals_full_matrix_form(jitted, cross_domain, seed):
    anchors, labels, domains, valid, prototypes = _contrastive_inputs(seed)
    assert np.any(valid & (labels == 4))
    got = jitted["contrastive"][cross_domain](anchors, labels, domains, valid, prototypes)
    expected = ref.contrastive_loss_full(
        anchors, labels, domains, valid, prototypes, cross_domain=cross_domain
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_contrastive_loss_with_three_domains_equals_full_form(jitted):
    anchors, labels, domains, valid, prototypes = _contrastive_inputs(5)
    domains = np.random.default_rng(6).integers(-1, 2, size=domains.shape).astype(np.int32)
    got = jitted["contrastive"][True](anchors, labels, domains, valid, prototypes)
    expected = ref.contrastive_loss_full(
        anchors, labels, domains, valid, prototypes, cross_domain=True
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_contrastive_loss_edge_cases(jitted):
    anchors, labels, domains, valid, prototypes = _contrastive_inputs(3)
    fn = jitted["contrastive"]
    # No valid anchor.
    assert float(fn[False](anchors, labels, domains, np.zeros_like(valid), prototypes)) == 0.0
    # One class only: no negatives, log_prob = 0 for everyone.
    one = np.zeros_like(labels)
    assert abs(float(fn[False](anchors, one, domains, valid, prototypes))) < 1e-6
    # One class and one domain: nobody has a cross-domain positive.
    assert float(fn[True](anchors, one, np.zeros_like(domains), valid, prototypes)) == 0.0
    # NaN features make a NaN loss, which becomes 0.
    bad = anchors.copy()
    bad[np.argmax(valid)] = np.nan
    assert float(fn[False](bad, labels, domains, valid, prototypes)) == 0.0


def test_contrastive_loss_gradients(jitted):
    anchors, labels, domains, valid, prototypes = _contrastive_inputs(4)

    def loss(a, p):
        return losses.pixel_prototype_contrastive_loss(
            a, labels, domains, valid, p, cross_domain=True
        )

    grad_a, grad_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(anchors, prototypes)
    assert np.all(np.isfinite(grad_a))
    assert np.any(grad_a[valid]) and not np.any(grad_a[~valid])
    assert not np.any(grad_p)


def test_contrastive_loss_bad_inputs_raise():
    anchors, labels, domains, valid, prototypes = _contrastive_inputs(0)
    with pytest.raises(ValueError, match="domains"):
        losses.pixel_prototype_contrastive_loss(anchors, labels, domains[:3], valid, prototypes)
    with pytest.raises(ValueError, match="prototypes"):
        losses.pixel_prototype_contrastive_loss(anchors, labels, domains, valid, prototypes[:, :3])
    with pytest.raises(ValueError, match="labels"):
        losses.pixel_prototype_contrastive_loss(
            anchors, np.full_like(labels, 9), domains, valid, prototypes
        )


# ----------------------------------------------------------------------------- sampled


@pytest.fixture(scope="session")
def sampled_fn():
    return jax.jit(
        functools.partial(
            losses.sampled_contrastive_loss,
            max_views=4,
            max_samples=24,
            easy_threshold=0.9,
            temperature=0.1,
            base_temperature=0.07,
            cross_domain=True,
        )
    )


def test_sampled_contrastive_loss_matches_manual_composition(sampled_fn):
    rng = np.random.default_rng(7)
    shape = (4, 8, 8)
    features = _unit(rng.normal(size=(*shape, 6))).astype(np.float32)
    label = _random_labels(rng, shape)
    pred = _random_labels(rng, shape, 0.0)
    prob = rng.random(shape).astype(np.float32)
    domain = np.array([0, 0, 1, 1], np.int32)
    prototypes = _unit(rng.normal(size=(NUM_CLASSES, 6))).astype(np.float32)
    key = jax.random.key(8)
    loss, count = sampled_fn(key, features, label, pred, prob, domain, prototypes)

    sample = jax.jit(
        functools.partial(
            sampling.sample_anchors,
            num_classes=NUM_CLASSES,
            max_views=4,
            max_samples=24,
            easy_threshold=0.9,
        )
    )(key, label, pred, prob)
    index = np.asarray(sample.index)
    anchors = features.reshape(-1, 6)[index]
    domains = domain[index // 64]
    expected = ref.contrastive_loss_full(
        anchors,
        np.asarray(sample.label),
        domains,
        np.asarray(sample.valid),
        prototypes,
        cross_domain=True,
    )
    assert int(count) == int(np.sum(sample.valid)) > 0
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

    grad = jax.jit(
        jax.grad(lambda f: sampled_fn(key, f, label, pred, prob, domain, prototypes)[0])
    )(jnp.asarray(features))
    assert np.all(np.isfinite(grad)) and np.any(grad)


def test_sampled_contrastive_loss_without_eligible_class_is_zero(sampled_fn):
    shape = (4, 8, 8)
    features = np.ones((*shape, 6), np.float32) / np.sqrt(6)
    label = np.full(shape, 255, np.int32)
    label[:, 0, :4] = 1  # 4 pixels = max_views: not eligible
    zeros = np.zeros(shape)
    loss, count = sampled_fn(
        jax.random.key(0),
        features,
        label,
        zeros.astype(np.int32),
        zeros.astype(np.float32),
        np.array([0, 0, 1, 1], np.int32),
        np.zeros((NUM_CLASSES, 6), np.float32),
    )
    assert float(loss) == 0.0 and int(count) == 0


_GLOBAL_MAX_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, numpy_reference as ref
from wsda_jax import losses
P = jax.sharding.PartitionSpec
mesh = jax.make_mesh((4,), ("data",))
rng = np.random.default_rng(5)
logits = rng.normal(size=(4, 6, 7, 5)).astype(np.float32)
logits[2] *= 8.0  # One device's magnitudes dominate: per-device and global maxima differ.
labels = rng.integers(0, 5, size=(4, 6, 7)).astype(np.int32)
key = jax.random.key(1)
split = jax.sharding.NamedSharding(mesh, P("data"))
logits_d, labels_d = jax.device_put(logits, split), jax.device_put(labels, split)
def per_device(axis_name):
    def body(lg, lb):
        loss = losses.boundary_loss(lg, lb, key, max_axis_name=axis_name)
        return jax.lax.pmean(loss, "data")
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))
noise = np.tile(np.asarray(jax.random.gumbel(key, (1, 6, 7, 5), dtype=jnp.float32)), (4, 1, 1, 1))
whole = ref.boundary_loss(logits, labels, noise, tau=0.5)  # One maximum over all 4 images.
per_image = np.mean(
    [ref.boundary_loss(logits[i : i + 1], labels[i : i + 1], noise[:1]) for i in range(4)]
)
global_max = float(per_device("data")(logits_d, labels_d))
print(global_max, whole, float(per_device(None)(logits_d, labels_d)), per_image)
"""


@pytest.mark.slow  # Several devices: a fresh process.
def test_boundary_loss_global_maximum_over_devices(tmp_path):
    """loss.boundary_max='global': the magnitudes of every device share one maximum, so
    4 devices x 1 image equal 1 device x 4 images; the default is per device (DDP)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS=subprocesses.xla_flags(4))
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=f"{os.path.dirname(tests_dir)}:{tests_dir}")
    result = subprocess.run(
        [sys.executable, "-c", _GLOBAL_MAX_SCRIPT],
        cwd=tests_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    global_max, whole, device_max, per_image = map(float, result.stdout.split())
    np.testing.assert_allclose(global_max, whole, rtol=1e-4)
    np.testing.assert_allclose(device_max, per_image, rtol=1e-4)
    assert abs(whole - per_image) > 2e-4  # The two forms are different losses here.
