"""The thing-class ImageNet feature distance (feature_distance.py) against NumPy written
here from DAFormer's `downscale_label_ratio` and `masked_feat_dist`, and in the step."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SIZE, synthetic_batch, tiny_config, tiny_model

from wsda_jax import feature_distance, optim, parallel, steps, train_state

IGNORE = 255


def _numpy_downscale(labels, factor, min_ratio, num_classes):
    """Cell by cell: the most frequent value among num_classes + 1 (ignore as the last),
    the first on ties; 255 if that is the ignore value or its share is below min_ratio."""
    batch, height, width = labels.shape
    h, w = height // factor, width // factor
    out = np.empty((batch, h, w), np.int64)
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                cell = labels[b, i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
                ids = np.where(cell == IGNORE, num_classes, cell).ravel()
                counts = np.bincount(ids, minlength=num_classes + 1)
                best = int(np.argmax(counts))
                share = counts[best] / factor**2
                out[b, i, j] = IGNORE if best == num_classes or share < min_ratio else best
    return out


def test_downscale_label_ratio_random():
    rng = np.random.default_rng(0)
    # Few classes and blocky maps so that many cells pass 0.75 and many do not.
    coarse = rng.integers(0, 3, (2, 6, 10))
    labels = np.repeat(np.repeat(coarse, 3, axis=1), 3, axis=2)
    labels = np.where(
        rng.uniform(size=labels.shape) < 0.15, rng.integers(0, 4, labels.shape), labels
    )
    labels = np.where(rng.uniform(size=labels.shape) < 0.1, IGNORE, labels)
    labels = labels[:, :17, :29]  # Not a multiple of 4: the remainder is dropped.
    for factor in (2, 4):
        got = feature_distance.downscale_label_ratio(jnp.asarray(labels), factor, 0.75, 3)
        expected = _numpy_downscale(labels, factor, 0.75, 3)
        np.testing.assert_array_equal(np.asarray(got), expected)
        assert (expected != IGNORE).any() and (expected == IGNORE).any()


def test_downscale_label_ratio_cases():
    """Exactly 3/4 stays (torch's `ratio < min_ratio` ignores), less does not; an ignore
    majority is ignored; a 1-px-wide pole vanishes (nearest resizing would keep it)."""
    cells = np.zeros((1, 2, 8), np.int64)
    cells[0, :, 0:2] = [[5, 5], [5, 1]]  # 3/4 class 5.
    cells[0, :, 2:4] = [[5, 5], [1, 1]]  # 1/2.
    cells[0, :, 4:6] = [[IGNORE, IGNORE], [IGNORE, 2]]  # Ignore majority.
    cells[0, :, 6:8] = [[3, 0], [3, 0]]  # Column of class 3.
    got = feature_distance.downscale_label_ratio(jnp.asarray(cells), 2, 0.75, 19)
    np.testing.assert_array_equal(np.asarray(got), [[[5, IGNORE, IGNORE, IGNORE]]])


def test_masked_feature_distance_is_the_masked_mean_of_l2_norms():
    rng = np.random.default_rng(1)
    student, frozen = rng.normal(size=(2, 2, 3, 2, 4)).astype(np.float32)
    mask = rng.uniform(size=(2, 3, 2)) < 0.5
    expected = np.linalg.norm(student - frozen, axis=-1)[mask].mean()
    got = feature_distance.masked_feature_distance(student, frozen, mask)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    empty = feature_distance.masked_feature_distance(student, frozen, np.zeros_like(mask))
    assert float(empty) == 0.0


def test_gradient_at_equal_features_is_zero_not_nan():
    """At step 0 a student without stochastic layers equals its frozen copy."""
    features = jnp.ones((1, 2, 2, 3))
    mask = jnp.ones((1, 2, 2), bool)
    grad = jax.grad(lambda f: feature_distance.masked_feature_distance(f, features, mask))(features)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def _fd_config():
    config = tiny_config()
    config.loss.imnet_fd = 1.0  # Large, to see it in the step.
    config.loss.imnet_fd_classes = (1, 3)
    return config


@pytest.fixture(scope="module")
def fd_setup():
    config = _fd_config()
    model = tiny_model(config, bn_axis_name=None)
    state = train_state.create_train_state(
        config, model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    # The frozen copy as ImageNet weights would differ from the student: perturb it.
    encoder = jax.tree.map(lambda x: x * 1.1 + 0.01, state.imnet_encoder)
    return config, model, state.replace(imnet_encoder=encoder)


def test_source_forward_against_the_formula(fd_setup):
    """The term equals the NumPy masked mean over the encoder outputs computed here with
    `encode` (train mode for the student, eval mode for the frozen copy), and the rest of
    the pass is `deeplab.train_forward`'s."""
    config, model, state = fd_setup
    batch = synthetic_batch(0, 2, "coarse")
    images = jnp.asarray(batch["source"]["image"], jnp.float32) / 64.0 - 2.0
    labels = jnp.asarray(batch["source"]["label"], jnp.int32)
    inputs = collections.namedtuple("Inputs", ["source_image", "source_label"])
    forward = functools.partial(feature_distance.train_forward_with_encoding, model, state.params)
    source_forward = jax.jit(
        lambda images, labels: feature_distance.source_forward(
            model,
            forward,
            state.batch_stats,
            inputs(source_image=images, source_label=labels),
            state.imnet_encoder,
            config,
        )
    )
    out, stats, terms = source_forward(images, labels)
    student, _ = model.apply(
        state.student_variables(), images, train=True, method="encode", mutable=["batch_stats"]
    )
    frozen = model.apply(state.imnet_encoder, images, train=False, method="encode")
    factor = IMAGE_SIZE // student.shape[2]
    small = _numpy_downscale(np.asarray(labels), factor, 0.75, config.num_classes)
    mask = np.isin(small, (1, 3))
    assert mask.any() and not mask.all()
    norms = np.linalg.norm(np.asarray(student) - np.asarray(frozen), axis=-1)
    np.testing.assert_allclose(float(terms["imnet_fd"]), norms[mask].mean(), rtol=1e-5)
    config.loss.imnet_fd = 0.0
    plain_out, plain_stats, none = feature_distance.source_forward(
        model, forward, state.batch_stats, inputs(images, labels), state.imnet_encoder, config
    )
    config.loss.imnet_fd = 1.0
    assert none == {}
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(plain_out.logits), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, stats, plain_stats)


def test_gradient_reaches_the_student_encoder_only(fd_setup):
    """The term trains the student's encoder, not its decoder, and the frozen copy is a
    constant (no gradient flows into it)."""
    config, model, state = fd_setup
    batch = synthetic_batch(0, 2, "coarse")
    inputs = collections.namedtuple("Inputs", ["source_image", "source_label"])(
        source_image=jnp.asarray(batch["source"]["image"], jnp.float32) / 64.0 - 2.0,
        source_label=jnp.asarray(batch["source"]["label"], jnp.int32),
    )

    def term(params, encoder):
        forward = functools.partial(feature_distance.train_forward_with_encoding, model, params)
        _, _, terms = feature_distance.source_forward(
            model, forward, state.batch_stats, inputs, encoder, config
        )
        return terms["imnet_fd"]

    to_params, to_encoder = jax.jit(jax.grad(term, argnums=(0, 1)))(
        state.params, state.imnet_encoder
    )

    def largest(tree):
        return max(float(jnp.abs(g).max()) for g in jax.tree.leaves(tree))

    assert largest(to_params["backbone"]) > 0
    assert largest({k: v for k, v in to_params.items() if k != "backbone"}) == 0
    assert largest(to_encoder) == 0


def test_adapt_step_trains_with_it_and_keeps_the_copy(fd_setup):
    """In the jitted step: the weighted term is logged and the frozen copy is not updated
    (its encoder's variables only)."""
    config, _, host_state = fd_setup
    model = tiny_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    step = parallel.shard_train_step(
        steps.adapt_step, mesh, model=model, optimizer=optimizer, config=config, contrast_on=False
    )
    host_state = jax.device_get(host_state)
    state = parallel.replicate(host_state, mesh)
    batch = parallel.put_batch(synthetic_batch(0, 2, "coarse"), mesh)
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["imnet_fd"])) and float(metrics["imnet_fd"]) > 0
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(state.imnet_encoder), host_state.imnet_encoder
    )
    assert set(state.imnet_encoder) == {"params", "batch_stats"}
    assert set(state.imnet_encoder["params"]) == {"backbone"}


def test_state_without_fd_has_no_copy():
    config = tiny_config()
    model = tiny_model(config, bn_axis_name=None)
    abstract = train_state.create_train_state(
        config, model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3), abstract=True
    )
    assert abstract.imnet_encoder == {}
    fd = train_state.create_train_state(
        _fd_config(), model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3), abstract=True
    )
    assert jax.tree.structure(fd.imnet_encoder["params"]) == jax.tree.structure(
        {"backbone": fd.params["backbone"]}
    )
