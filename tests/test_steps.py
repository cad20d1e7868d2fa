"""Tests of wsda_jax.steps on a tiny DeepLab (one compiled adapt step shared by the file)."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import PIL.Image
import pytest
from conftest import IMAGE_SIZE, NUM_CLASSES, synthetic_batch, tiny_config, tiny_model

from wsda_jax import (
    augment,
    classes,
    contrastive,
    ema,
    evaluation,
    metrics,
    optim,
    parallel,
    prediction,
    pseudo_labels,
    step_inputs,
    steps,
    train_state,
)
from wsda_jax.models import deeplab


class Runner:
    """A compiled adapt step on a 1-device mesh, its initial state and a fixed batch pair."""

    def __init__(self, weak_label="coarse", presence="crop", max_traces=None):
        self.config = tiny_config(weak_label)
        self.config.presence = presence
        self.model = tiny_model(self.config)
        self.optimizer = optim.make_optimizer(self.config)
        self.mesh = parallel.make_mesh(jax.devices()[:1])
        state = train_state.create_train_state(
            self.config, self.model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3)
        )
        self.initial = jax.device_get(state)
        self.batches = [synthetic_batch(seed, 2, weak_label) for seed in (0, 1)]
        step_fn = steps.adapt_step
        if max_traces is not None:  # Counted per creating fixture (chex's footprint).
            step_fn = chex.assert_max_traces(step_fn, n=max_traces)
        self.step = parallel.shard_train_step(
            step_fn,
            self.mesh,
            model=self.model,
            optimizer=self.optimizer,
            config=self.config,
            contrast_on=True,
        )

    def state(self, host_state=None):
        """A fresh device copy (the step donates its state argument)."""
        return parallel.replicate(self.initial if host_state is None else host_state, self.mesh)

    def put(self, batch):
        return parallel.put_batch(batch, self.mesh)


@pytest.fixture(scope="session")
def runner():
    return Runner("coarse", max_traces=1)


@pytest.fixture(scope="session")
def image_tags_runner():
    """Image labels with whole-image presence: the batch's 'presence' reaches the losses."""
    return Runner("image", presence="image")


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, _host(a), _host(b))


def test_step_compiles_once_and_runs(runner):
    """Five steps, one trace: a retrace of the shared step fails (chex.assert_max_traces)."""
    state = runner.state()
    params0 = _host(state.params)
    batch = runner.put(runner.batches[0])
    # No host round trip inside the step: an implicit transfer would raise here.
    with jax.transfer_guard("disallow"):
        for _ in range(5):
            state, step_metrics = runner.step(state, batch)
    assert int(state.step) == 5 and int(state.skipped_steps) == 0
    expected = {"seg_u", "im_u", "seg_s", "edge_s", "im_proto", "inter", "intra_src"}
    expected |= {"intra_tgt", "seg_mix", "total", "learning_rate", "grad_norm", "skipped_steps"}
    expected |= {"pseudo_confident_fraction", "anchors_inter", "anchors_intra_src"}
    assert expected <= set(step_metrics)
    for name, value in step_metrics.items():
        assert np.isfinite(value), name
    assert float(step_metrics["anchors_inter"]) > 0
    # Prototypes are filled in (classes occur in the source labels / coarse labels).
    assert np.abs(np.asarray(state.source_prototypes)).sum() > 0
    assert np.abs(np.asarray(state.target_prototypes)).sum() > 0
    assert not np.allclose(
        params0["head"]["projection"]["kernel"], state.params["head"]["projection"]["kernel"]
    )


def test_teacher_ema_numbers():
    config = tiny_config()
    student = {"w": jnp.ones(3)}
    state = train_state.TrainState(
        step=jnp.int32(0),
        params=student,
        batch_stats={"mean": jnp.full(2, 2.0)},
        opt_state=(),
        teacher_params={"w": jnp.zeros(3)},
        teacher_batch_stats={"mean": jnp.zeros(2)},
        source_prototypes=jnp.zeros((1, 1)),
        target_prototypes=jnp.zeros((1, 1)),
        rng=jax.random.PRNGKey(0),
        skipped_steps=jnp.int32(0),
    )
    params, batch_stats = ema.ema_update(state, config)
    np.testing.assert_allclose(params["w"], 0.001, rtol=1e-4)
    np.testing.assert_allclose(batch_stats["mean"], 0.002, rtol=1e-4)
    config.ema.ramp = True  # a = min(1 - 1/(step+1), 0.999): the student at step 0.
    params, _ = ema.ema_update(state, config)
    np.testing.assert_allclose(params["w"], 1.0)
    params, _ = ema.ema_update(state.replace(step=jnp.int32(9)), config)
    np.testing.assert_allclose(params["w"], 0.1, rtol=1e-5)


def test_teacher_ema_in_step(runner):
    """After two steps: teacher params = 0.999 * teacher_1 + 0.001 * student_1; the teacher's
    BN statistics are that blend, then updated by the teacher's own train-mode forward on
    the target batch (docs/method.md §4.4, as the reference)."""
    state = runner.state()
    batch = runner.put(runner.batches[0])
    state, _ = runner.step(state, batch)
    after_one = _host(state)
    # At creation teacher == student, so the first EMA leaves the teacher at student_0.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
        after_one.teacher_params,
        runner.initial.params,
    )
    # The teacher sees the target crop after the step's colour jitter (its key: the
    # step's key on device 0, split as in adapt_step).
    device_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
    names = step_inputs.ADAPT_KEYS
    jitter_key = dict(zip(names, jax.random.split(device_key, len(names)), strict=True))["jitter_t"]
    target_image = jax.jit(lambda key, x: step_inputs.input_images(key, x, runner.config))(
        jitter_key, runner.batches[0]["target"]["image"]
    )
    state, _ = runner.step(state, batch)
    blend = lambda t, s: 0.999 * t + 0.001 * s
    expected_params = jax.tree.map(blend, after_one.teacher_params, after_one.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        _host(state.teacher_params),
        expected_params,
    )
    blended_stats = jax.tree.map(blend, after_one.teacher_batch_stats, after_one.batch_stats)
    model = tiny_model(runner.config, bn_axis_name=None)
    teacher_forward = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    _, updates = teacher_forward(
        {"params": expected_params, "batch_stats": blended_stats}, target_image
    )
    teacher_stats = _host(state.teacher_batch_stats)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        teacher_stats,
        _host(updates["batch_stats"]),
    )
    # The old behaviour (the forward's update discarded) would leave the plain blend.
    assert any(
        not np.allclose(a, b, rtol=1e-3)
        for a, b in zip(jax.tree.leaves(teacher_stats), jax.tree.leaves(blended_stats), strict=True)
    )
    # The student's BN statistics move during training (chained over the passes).
    leaves_before = jax.tree.leaves(runner.initial.batch_stats)
    leaves_after = jax.tree.leaves(after_one.batch_stats)
    assert any(not np.allclose(a, b) for a, b in zip(leaves_before, leaves_after, strict=True))


def _fake_output(logits_full, logits_low):
    batch, h, w, _ = logits_low.shape
    return deeplab.SegmentationOutput(
        features=jnp.ones((batch, h, w, 4)) / 2.0,
        lowres_logits=jnp.asarray(logits_low, jnp.float32),
        logits=jnp.asarray(logits_full, jnp.float32),
    )


def test_pseudo_labels_weak_overwrite_and_masking():
    config = tiny_config("coarse")
    config.pseudo.proto_threshold = 0.9
    rng = np.random.default_rng(0)
    logits_full = rng.normal(size=(2, 16, 16, NUM_CLASSES)) * 3
    logits_low = rng.normal(size=(2, 2, 2, NUM_CLASSES)) * 3
    weak = np.full((2, 16, 16), 255, np.int32)
    weak[:, 4:8, 4:12] = 3
    target = {"weak_label": jnp.asarray(weak), "presence": jnp.ones((2, NUM_CLASSES))}
    out = _fake_output(logits_full, logits_low)
    argmax = logits_full.argmax(-1)
    result = pseudo_labels.pseudo_labels(
        out, target["weak_label"], target["presence"], config, None
    )
    np.testing.assert_array_equal(result.label, np.where(weak != 255, weak, argmax))
    low_prob = jax.nn.softmax(logits_low, axis=-1)
    masked = np.where(np.max(low_prob, -1) < 0.9, 255, logits_low.argmax(-1))
    np.testing.assert_array_equal(result.masked_lowres, masked)
    # 'image': the weak map is ignored; with filter_by_presence absent classes are dropped.
    config.weak_label = "image"
    result = pseudo_labels.pseudo_labels(
        out, target["weak_label"], target["presence"], config, None
    )
    np.testing.assert_array_equal(result.label, argmax)
    config.pseudo.filter_by_presence = True
    config.pseudo.proto_threshold = 0.0
    presence = np.zeros((2, NUM_CLASSES), np.float32)
    presence[:, 1] = 1.0
    target["presence"] = jnp.asarray(presence)
    result = pseudo_labels.pseudo_labels(
        out, target["weak_label"], target["presence"], config, None
    )
    low_argmax = logits_low.argmax(-1)
    np.testing.assert_array_equal(result.masked_lowres, np.where(low_argmax == 1, 1, 255))


def test_pseudo_label_weight_fraction_and_rows():
    config = tiny_config()
    config.pseudo.threshold = 0.968
    config.pseudo.ignore_top = 2
    config.pseudo.ignore_bottom = 3
    confidence = np.full((2, 10, 4), 0.5, np.float32)
    confidence[0, :, :2] = 0.968  # Exactly at the threshold counts as confident.
    confidence[1, 5, :] = 0.99
    weight, q = pseudo_labels.pseudo_label_weight(jnp.asarray(confidence), config, None)
    expected_q = (20 + 4) / 80
    np.testing.assert_allclose(q, expected_q, rtol=1e-6)
    expected = np.where(confidence >= 0.968, expected_q, 0.0)
    expected[:, :2] = 0.0
    expected[:, 7:] = 0.0
    np.testing.assert_allclose(weight, expected, rtol=1e-6)
    assert weight[0, 2, 0] > 0 and weight[0, 6, 0] > 0


def test_mixed_batch_classmix_rule():
    config = tiny_config()
    config.classmix.jitter_prob = 0.0
    config.classmix.blur_prob = 0.0
    batch = synthetic_batch(3, 2, "coarse", size=16)
    source_image = augment.normalize(batch["source"]["image"])
    target_image = augment.normalize(batch["target"]["image"])
    source_label = jnp.asarray(batch["source"]["label"])
    pseudo = (jnp.full((2, 16, 16), 4, jnp.int32), jnp.full((2, 16, 16), 0.3))
    mix = jax.jit(lambda *args: augment.mixed_batch(*args, config.classmix))
    mixed = mix(jax.random.PRNGKey(0), source_image, source_label, target_image, *pseudo)
    mask = np.asarray(mixed.mask)
    ids = np.unique(batch["source"]["label"])
    for i in range(2):
        chosen = np.unique(batch["source"]["label"][i][mask[i]])
        assert len(chosen) <= (len(ids) + 1) // 2
        assert not np.isin(batch["source"]["label"][i][~mask[i]], chosen).any()
    np.testing.assert_array_equal(mixed.label, np.where(mask, batch["source"]["label"], 4))
    np.testing.assert_allclose(mixed.weight, np.where(mask, 1.0, 0.3), rtol=1e-6)
    expected = np.where(mask[..., None], source_image, target_image)
    np.testing.assert_allclose(mixed.image, expected, atol=1e-4)
    config.classmix.enabled = False
    # A new trace for the flag.
    mix = jax.jit(lambda *args: augment.mixed_batch(*args, config.classmix))
    mixed = mix(jax.random.PRNGKey(0), source_image, source_label, target_image, *pseudo)
    assert not np.asarray(mixed.mask).any()
    np.testing.assert_allclose(mixed.image, target_image, atol=1e-4)


def test_nonfinite_guard_skips_update(image_tags_runner):
    runner = image_tags_runner
    state = runner.state()
    before = _host(state)
    bad = jax.tree.map(np.copy, runner.batches[0])
    bad["target"]["presence"][0, 0] = np.nan  # Makes the image-level losses NaN.
    state, step_metrics = runner.step(state, runner.put(bad))
    assert not np.isfinite(float(step_metrics["total"]))
    assert int(state.skipped_steps) == 1 and int(state.step) == 1
    assert float(step_metrics["skipped_steps"]) == 1.0
    for name in ("params", "batch_stats", "source_prototypes", "target_prototypes"):
        _assert_trees_equal(getattr(state, name), getattr(before, name))
    # The momentum is kept, but the schedule advances with the step, as the reference.
    momentum = lambda opt_state: optax.tree_utils.tree_get_all_with_path(opt_state, "trace")
    _assert_trees_equal(momentum(state.opt_state), momentum(before.opt_state))
    counts = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
    assert len(counts) == 2 and all(int(count) == 1 for _, count in counts)
    state, _ = runner.step(state, runner.put(runner.batches[0]))
    assert int(state.skipped_steps) == 1 and int(state.step) == 2
    counts = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
    assert all(int(count) == 2 for _, count in counts)
    assert not np.allclose(
        before.params["head"]["projection"]["kernel"], state.params["head"]["projection"]["kernel"]
    )


def test_total_loss_falls(runner):
    state = runner.state()
    batches = [runner.put(b) for b in runner.batches]
    totals = []
    for i in range(30):
        state, step_metrics = runner.step(state, batches[i % 2])
        totals.append(float(step_metrics["total"]))
    assert np.all(np.isfinite(totals))
    assert int(state.skipped_steps) == 0
    assert np.mean(totals[-4:]) < 0.8 * np.mean(totals[:2]), totals


@pytest.mark.parametrize("weak_label", ["point", "image", "none"])
def test_other_weak_label_kinds_trace(weak_label):
    """Every kind traces through shard_map with check_vma (compiling each is the slow test)."""
    config = tiny_config(weak_label)
    config.pseudo.filter_by_presence = weak_label == "image"
    model = tiny_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    abstract = train_state.create_train_state(
        config, model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3), abstract=True
    )
    step = parallel.shard_train_step(
        steps.adapt_step, mesh, model=model, optimizer=optimizer, config=config, contrast_on=True
    )
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), synthetic_batch(0, 2, weak_label)
    )
    shapes = jax.eval_shape(step, abstract, batch)
    _, step_metrics = shapes
    assert ("seg_u" in step_metrics) == (weak_label == "point")
    # Plain UDA has no presence vector: no image-level losses.
    assert ("im_u" in step_metrics) == ("im_proto" in step_metrics) == (weak_label != "none")
    assert "inter" in step_metrics


@pytest.mark.parametrize(
    "weak_label",
    # 'image': image_tags_runner; 'point' also runs in test_parallel.
    [pytest.param("point", marks=pytest.mark.extended), "none"],
)
def test_other_weak_label_kinds_run(weak_label):
    run = Runner(weak_label)
    state, step_metrics = run.step(run.state(), run.put(run.batches[0]))
    state, step_metrics = run.step(state, run.put(run.batches[1]))
    assert int(state.skipped_steps) == 0
    for name, value in step_metrics.items():
        assert np.isfinite(value), name


def test_source_only_step(runner):
    step = parallel.shard_train_step(
        steps.source_only_step,
        runner.mesh,
        model=runner.model,
        optimizer=runner.optimizer,
        config=runner.config,
    )
    state = runner.state()
    batch = runner.put(runner.batches[0])
    totals = []
    for _ in range(6):
        state, step_metrics = step(state, batch)
        totals.append(float(step_metrics["total"]))
    assert set(step_metrics) >= {"seg_s", "edge_s", "total", "grad_norm", "learning_rate"}
    assert totals[-1] < totals[0], totals
    assert int(state.step) == 6 and int(state.skipped_steps) == 0
    # The teacher is EMA-updated in stage 1 too: it has left the initial student.
    assert any(
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree.leaves(_host(state.teacher_params)),
            jax.tree.leaves(runner.initial.params),
            strict=True,
        )
    )


def _projection_kernel(state):
    return np.asarray(state.params["head"]["projection"]["kernel"])


def test_source_only_contrast_trains_the_projection_head(runner):
    """config.loss.source_only_contrast adds intra_src to stage 1: the source prototypes
    move and the projection head gets a gradient. Off (the reference), the prototypes
    stay zero; the other terms are the same either way."""
    runs = {}
    for contrast in (False, True):
        config = runner.config.copy_and_resolve_references()
        config.loss.source_only_contrast = contrast
        step = parallel.shard_train_step(
            steps.source_only_step,
            runner.mesh,
            model=runner.model,
            optimizer=runner.optimizer,
            config=config,
        )
        state, step_metrics = step(runner.state(), runner.put(runner.batches[0]))
        runs[contrast] = (_host(state), {k: float(v) for k, v in step_metrics.items()})
    (off, off_metrics), (on, on_metrics) = runs[False], runs[True]
    assert "intra_src" not in off_metrics and "anchors_intra_src" not in off_metrics
    assert on_metrics["intra_src"] > 0 and on_metrics["anchors_intra_src"] > 0
    for name in ("seg_s", "edge_s"):
        assert on_metrics[name] == off_metrics[name], name
    np.testing.assert_allclose(
        on_metrics["total"],
        on_metrics["seg_s"] + on_metrics["edge_s"] + on_metrics["intra_src"],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(off.source_prototypes, 0.0)
    assert np.abs(on.source_prototypes).sum() > 0
    assert not np.allclose(_projection_kernel(on), _projection_kernel(off))


def _eval_batch(runner):
    return {
        "image": runner.batches[1]["target"]["image"],
        "label": runner.batches[1]["target"]["label"],
        "mask": np.asarray([True, False]),
    }


def test_eval_step_confusion_of_unmasked_images(runner):
    variables = runner.initial.student_variables()
    eval_batch = _eval_batch(runner)
    eval_fn = parallel.shard_eval_step(
        evaluation.eval_step, runner.mesh, model=runner.model, num_classes=NUM_CLASSES
    )
    confusion = np.asarray(eval_fn(variables, runner.put(eval_batch)))
    assert confusion.dtype == np.int32
    logits = jax.jit(lambda v, x: runner.model.apply(v, x, train=False).logits)(
        variables, augment.normalize(eval_batch["image"])
    )
    pred = np.asarray(logits).argmax(-1)
    expected = metrics.confusion_matrix(pred[:1], eval_batch["label"][:1], NUM_CLASSES)
    np.testing.assert_array_equal(confusion, expected)
    assert confusion.sum() == IMAGE_SIZE * IMAGE_SIZE
    # One image per forward (config.eval.images_per_forward=1) counts the same pixels.
    chunked_fn = parallel.shard_eval_step(
        evaluation.eval_step,
        runner.mesh,
        model=runner.model,
        num_classes=NUM_CLASSES,
        images_per_forward=1,
    )
    np.testing.assert_array_equal(
        np.asarray(chunked_fn(variables, runner.put(eval_batch))), expected
    )


def test_predict_multiscale_flip_averages(runner):
    """Scales 1 and 0.5 with flips: the mean of four forwards resized back to full size,
    the expectation resized by NumPy (bilinear, half-pixel centres), not by the code."""
    variables = runner.initial.student_variables()
    images = _eval_batch(runner)["image"]
    logits = jax.jit(
        lambda v, x: evaluation.predict(v, x, model=runner.model, scales=(1.0, 0.5), flip=True)
    )(variables, images)
    forward = jax.jit(lambda v, y: runner.model.apply(v, y, train=False).logits)
    run = lambda y: np.asarray(forward(variables, jnp.asarray(y, jnp.float32)), np.float64)
    flip = lambda y: y[:, :, ::-1]
    x = np.asarray(augment.normalize(images), np.float64)
    half = ref.bilinear_resize(x, 16, 16)
    up = lambda y: ref.bilinear_resize(y, IMAGE_SIZE, IMAGE_SIZE)
    expected = (run(x) + flip(run(flip(x))) + up(run(half)) + up(flip(run(flip(half))))) / 4
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_predict_directory_on_images_of_different_sizes(runner, tmp_path):
    """Predict mode on two images of other sizes (one not a multiple of 8): one PNG each,
    at its input's size, and the same labels as the eval-mode argmax at that size."""
    variables = parallel.replicate(runner.initial.student_variables(), runner.mesh)
    rng = np.random.default_rng(0)
    sizes = {"a.png": (36, 52), "b.jpg": (24, 40)}
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, (height, width) in sizes.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(inputs / name, quality=100)
    written = prediction.predict_directory(
        runner.config, variables, str(inputs), str(tmp_path / "out"), model=runner.model
    )
    assert sorted(os.path.basename(path) for path in written) == ["a.png", "b.png"]
    palette = classes.colorize(np.arange(NUM_CLASSES, dtype=np.uint8)[None])[0]
    forward = jax.jit(lambda v, x: runner.model.apply(v, x, train=False).logits)
    for name, (height, width) in sizes.items():
        out = np.asarray(PIL.Image.open(tmp_path / "out" / (name[:-4] + ".png")).convert("RGB"))
        assert out.shape == (height, width, 3)
        pixels = np.asarray(PIL.Image.open(inputs / name).convert("RGB"))[None]
        logits = forward(variables, augment.normalize(pixels))
        assert logits.shape == (1, height, width, NUM_CLASSES)
        expected = palette[np.asarray(logits)[0].argmax(-1)]
        np.testing.assert_array_equal(out, expected)


def test_presence_comes_from_the_crop_of_the_weak_label():
    """docs/method.md §4: the presence vector is the set of classes in the weak-label
    crop (coarse / point / image kinds), not the record's whole-image presence."""
    config = tiny_config("coarse")
    crop = np.full((2, 8, 8), 255, np.int32)
    crop[0, :2, :2] = 3
    crop[1, 4:, 4:] = 0
    crop[1, 0, 0] = 4
    target = {"weak_label": jnp.asarray(crop), "presence": jnp.ones((2, NUM_CLASSES))}
    expected = np.zeros((2, NUM_CLASSES), np.float32)
    expected[0, 3] = expected[1, 0] = expected[1, 4] = 1.0
    for kind in ("coarse", "point", "image"):
        config.weak_label = kind
        weak, presence = step_inputs.target_weak_labels(target, config)
        np.testing.assert_array_equal(presence, expected)
        # For image labels only the presence carries information: the map is all 255.
        np.testing.assert_array_equal(weak, crop if kind != "image" else np.full_like(crop, 255))
    config.presence = "image"  # True image-level tags: the record's vector.
    _, presence = step_inputs.target_weak_labels(target, config)
    np.testing.assert_array_equal(presence, np.ones((2, NUM_CLASSES)))


def test_step_ignores_record_presence_unless_asked(runner, image_tags_runner):
    """The compiled step reads the crop's presence: changing the record's vector changes
    nothing, except with config.presence='image'."""
    for active, run in ((False, runner), (True, image_tags_runner)):
        batch = run.batches[0]
        other = jax.tree.map(np.copy, batch)
        other["target"]["presence"] = 1.0 - other["target"]["presence"]
        _, first = run.step(run.state(), run.put(batch))
        _, second = run.step(run.state(), run.put(other))
        same = float(first["im_u"]) == float(second["im_u"])
        assert same != active, (active, float(first["im_u"]), float(second["im_u"]))


def test_inter_takes_plain_downsampled_source_labels():
    """`inter` anchors use the source labels as they are (ignored pixels stay ignored),
    while `intra_src` fuses them with the prediction (docs/method.md §8)."""
    config = tiny_config("coarse")
    batch, h, w, size = 2, 8, 8, 64
    features = jnp.ones((batch, h, w, 4)) / 2.0
    confident = np.zeros((batch, h, w, NUM_CLASSES), np.float32)
    confident[..., 1] = 20.0  # Predicts class 1 everywhere, with confidence ~1.
    out = deeplab.SegmentationOutput(
        features=features,
        lowres_logits=jnp.asarray(confident),
        logits=jnp.zeros((batch, size, size, NUM_CLASSES)),
    )
    ignored = jnp.full((batch, size, size), 255, jnp.int32)
    teacher = (features, jnp.full((batch, h, w), 255, jnp.int32), jnp.ones((batch, h, w)))
    names = ("inter", "intra_src", "intra_tgt")
    keys = dict(zip(names, jax.random.split(jax.random.key(0), 3), strict=True))
    protos = jnp.ones((NUM_CLASSES, 4)) / 2.0
    losses_fn = jax.jit(lambda *args: contrastive.contrastive_losses(*args, config))
    _, counts = losses_fn(keys, out, out, ignored, ignored, *teacher, protos, protos)
    assert int(counts["inter"]) == 0  # Fused labels would make every pixel a class-1 anchor.
    assert int(counts["intra_src"]) > 0
