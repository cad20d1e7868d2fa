"""DAFormer (MiT encoder + DAFormer decoder + projection head): variable tree, stride-4
outputs, dropout only in the student's stochastic forward, BatchNorm sync, config."""

import functools
import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
import subprocesses
import tiny_runs

from wsda_jax import config_lib, config_presets, parallel
from wsda_jax.models import daformer_head, deeplab
from wsda_jax.tools.benchmarks import train_step as train_step_bench

NUM_CLASSES = 3
PROJ_DIM = 8
# A tiny MiT-B0: widths divisible by the stages' heads (1, 2, 5, 8), one block per stage.
EMBED_DIMS = (8, 8, 10, 16)


def tiny_model(**kwargs):
    args = dict(num_classes=NUM_CLASSES, variant="b0", embed_dims=EMBED_DIMS)
    args.update(depths=(1, 1, 1, 1), decoder_dim=16, proj_dim=PROJ_DIM, drop_path_rate=0.0)
    args.update(kwargs)
    return daformer_head.DAFormer(**args)


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_variables(model, seed=0, shape=(1, 64, 64, 3)):
    """Random variables on the host (non-trivial BN statistics and affine parameters);
    `shape`: of the images, or the head's levels."""
    rng = np.random.default_rng(seed)
    inputs = jax.tree.map(jnp.zeros_like, shape) if isinstance(shape, list) else jnp.zeros(shape)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, train=False))
    out = {}
    for path, leaf in flax.traverse_util.flatten_dict(shapes).items():
        if path[-1] == "kernel":
            value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif path[-1] in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = 0.1 * rng.standard_normal(leaf.shape)
        out[path] = jnp.asarray(value, jnp.float32)
    return flax.traverse_util.unflatten_dict(out)


# One image shape for every test (one compile each): not a multiple of 32 (ceil sizes).
IMAGES = (2, 40, 72, 3)
evaluate = jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)
train_forward = jax.jit(deeplab.train_forward, static_argnums=0)


@pytest.fixture(scope="module")
def model_and_variables():
    model = tiny_model()
    return model, random_variables(model)


def test_variable_tree():
    model = tiny_model(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    assert set(shapes["params"]) == {"backbone", "head"}
    assert set(shapes["batch_stats"]) == {"head"}  # The MiT has LayerNorms only.
    head = shapes["params"]["head"]
    assert set(head) == {f"embed_{i}" for i in range(4)} | {f"aspp_{j}" for j in range(4)} | {
        "bottleneck",
        "classifier",
        "projection",
    }
    assert head["embed_2"]["kernel"].shape == (10, 16)
    assert head["aspp_0"]["conv"]["kernel"].shape == (1, 1, 64, 16)  # 4 levels x 16.
    assert head["aspp_3"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 64)
    assert head["aspp_3"]["pointwise"]["conv"]["kernel"].shape == (1, 1, 64, 16)
    assert head["bottleneck"]["conv"]["kernel"].shape == (3, 3, 64, 16)  # 4 branches x 16.
    assert head["classifier"]["kernel"].shape == (1, 1, 16, NUM_CLASSES)
    assert head["projection"]["kernel"].shape == (16, PROJ_DIM)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    # encode: MiT stage 4, stride 32.
    encoded = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((1, 64, 96, 3)), train=False, method="encode"), shapes
    )
    assert encoded.shape == (1, 2, 3, EMBED_DIMS[-1])


def test_stride4_outputs_and_unit_features(model_and_variables):
    model, variables = model_and_variables
    batch, height, width, _ = IMAGES
    out = evaluate(model, variables, normal(1, IMAGES))
    h, w = -(-height // 4), -(-width // 4)
    assert out.features.shape == (batch, h, w, PROJ_DIM)
    assert out.lowres_logits.shape == (batch, h, w, NUM_CLASSES)
    assert out.logits.shape == (batch, height, width, NUM_CLASSES)
    norms = np.linalg.norm(np.asarray(out.features), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    upsampled = ref.bilinear_resize(np.asarray(out.lowres_logits), height, width)
    np.testing.assert_allclose(out.logits, upsampled, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out.lowres_logits[0] - out.lowres_logits[1])).max() > 1e-3


@pytest.mark.parametrize(("size_in", "size_out"), [((2, 3), (8, 12)), ((3, 5), (10, 18))])
def test_level_upsampling_is_half_pixel_bilinear(size_in, size_out):
    """jax.image.resize (the head's upsampling of the coarser levels) equals torch's
    interpolate(bilinear, align_corners=False) for upsampling, also by non-integer factors
    (ceil sizes of images not divisible by 32); tests/test_daformer_parity.py checks
    against torch itself."""
    x = np.random.default_rng(0).standard_normal((1, *size_in, 4))
    got = jax.image.resize(jnp.asarray(x, jnp.float32), (1, *size_out, 4), method="bilinear")
    np.testing.assert_allclose(got, ref.bilinear_resize(x, *size_out), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_the_students_forward(model_and_variables):
    """`train_forward` without a key (the EMA teacher) is deterministic; with one (the
    student) Dropout2d drops channels of the fused map before the classifier only: the
    features, read before it, are the teacher's. Both update every BN's statistics."""
    model, variables = model_and_variables
    images = normal(2, IMAGES)
    params, stats = variables["params"], variables["batch_stats"]
    teacher, new_stats = train_forward(model, params, stats, images)
    again, _ = train_forward(model, params, stats, images)
    np.testing.assert_array_equal(teacher.logits, again.logits)
    student, _ = train_forward(model, params, stats, images, jax.random.key(1))
    other, _ = train_forward(model, params, stats, images, jax.random.key(2))
    np.testing.assert_allclose(student.features, teacher.features, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(student.lowres_logits - teacher.lowres_logits)).max() > 1e-4
    assert np.abs(np.asarray(student.lowres_logits - other.lowres_logits)).max() > 1e-4
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(), new_stats, stats)
    assert min(jax.tree.leaves(moved)) > 0
    with pytest.raises(flax.errors.InvalidRngError):  # A stochastic forward needs a key.
        jax.eval_shape(
            lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]), variables
        )


def test_head_bn_statistics_sync_over_axis():
    """With bn_axis_name, the head's per-shard batch statistics equal the full-batch ones."""
    head = daformer_head.DAFormerHead(NUM_CLASSES, decoder_dim=8, proj_dim=PROJ_DIM)
    levels = [normal(i, (2, 16 // s, 24 // s, 4 * s)) for i, s in enumerate((1, 2, 4, 8))]
    variables = random_variables(head, shape=levels)
    synced = head.clone(bn_axis_name="shards")

    def run(net, xs):
        return net.apply(variables, xs, train=True, mutable=["batch_stats"])

    per_shard = jax.vmap(functools.partial(run, synced), axis_name="shards")
    (logits_sync, _), upd_sync = jax.jit(per_shard)([x[:, None] for x in levels])
    (logits_full, _), upd_full = jax.jit(functools.partial(run, head))(levels)
    np.testing.assert_allclose(
        logits_sync.reshape(logits_full.shape), logits_full, rtol=1e-4, atol=1e-4
    )
    got = upd_sync["batch_stats"]["aspp_2"]["depthwise"]["bn"]["var"][0]
    want = upd_full["batch_stats"]["aspp_2"]["depthwise"]["bn"]["var"]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert (
        np.abs(
            np.asarray(want - variables["batch_stats"]["aspp_2"]["depthwise"]["bn"]["var"])
        ).max()
        > 1e-3
    )


def test_build_model_from_config():
    config = config_lib.base_config()
    config.model.arch = "daformer"
    config.model.mit = "b1"
    config.model.mit_embed_dims = EMBED_DIMS
    config.model.mit_depths = (1, 1, 1, 1)
    config.model.decoder_dim = 16
    config.compute_dtype = "bfloat16"
    config.model.remat = "blocks"  # Passed to the MiT: each transformer block rematerialised.
    model = deeplab.build_model(config, bn_axis_name="data")
    assert isinstance(model, daformer_head.DAFormer) and model.remat == "blocks"
    assert (model.variant, tuple(model.embed_dims), model.decoder_dim) == ("b1", EMBED_DIMS, 16)
    assert (model.drop_path_rate, model.proj_dim, model.num_classes) == (0.1, 256, 19)
    assert model.bn_axis_name == "data" and model.dtype == jnp.bfloat16
    config.model.arch = "resnet"
    with pytest.raises(ValueError, match="config.model.arch='resnet'"):
        deeplab.build_model(config)


def _run_cli(tmp_path, tmp_path_factory, config, *overrides):
    """`python -m wsda_jax.main --config=configs/CONFIG.py:tiny` with
    --config.model.arch=daformer (the tiny preset's MiT-B0 of one narrow block per stage):
    two steps, one evaluation; returns its eval report after checking the run."""
    workdir = tmp_path / "run"
    result = subprocesses.run_main(
        tmp_path_factory.getbasetemp(),
        f"--config=configs/{config}.py:tiny",
        f"--workdir={workdir}",
        "--config.model.arch=daformer",
        "--config.num_steps=2",
        "--config.eval.every_steps=2",
        "--config.per_device_batch_size=2",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    train = tiny_runs.train_lines(workdir)
    assert [line["step"] for line in train] == [1, 2]
    assert all(np.isfinite(line["total"]) and line["skipped_steps"] == 0 for line in train)
    assert os.listdir(workdir / "checkpoints") == ["2"]
    return json.load(open(workdir / "eval" / "2.json"))


@pytest.mark.slow
def test_cli_trains_and_evaluates_daformer(tmp_path, tmp_path_factory):
    """Stage 1 with the DAFormer architecture through the CLI: it trains, checkpoints and
    evaluates (its adaptation step: traced below, run by the extended test)."""
    report = _run_cli(tmp_path, tmp_path_factory, "synthetic_source_only")
    assert 0.0 <= report["student"]["miou"] <= 1.0
    assert report["student"]["pixels"] == 8 * 32 * 64  # Every val pixel of the tiny split.


@pytest.mark.slow
@pytest.mark.extended
def test_cli_adapts_and_evaluates_daformer(tmp_path, tmp_path_factory):
    """The adaptation stage with the DAFormer architecture through the CLI."""
    contrast_start = "--config.loss.contrast_start=2"  # One train program: before it.
    report = _run_cli(tmp_path, tmp_path_factory, "synthetic_coarse", contrast_start)
    for name in ("student", "teacher"):
        assert 0.0 <= report[name]["miou"] <= 1.0
        assert report[name]["pixels"] == 8 * 32 * 64


def test_adapt_step_traces_with_daformer():
    """The sharded adaptation step with the DAFormer recipe on the tiny MiT, with the
    ImageNet feature distance on the MiT's last stage and MIC, traces through shard_map
    with check_vma and logs their terms (tracing only: compiling it costs a minute)."""
    config = config_presets.synthetic(stage="adapt", weak_label="coarse", arg="daformer,tiny")
    config.loss.imnet_fd = 0.005
    config.mic.enabled = True
    assert config.loss.contrast_start == 0
    mesh = parallel.make_mesh(jax.devices()[:1])
    model, optimizer, step = train_step_bench.make_step(config, mesh)
    state = train_step_bench.abstract_state(config, model, optimizer, mesh)
    batch = train_step_bench.abstract_batch(config, mesh)
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert {"imnet_fd", "mic", "seg_mix", "inter", "intra_src", "im_proto"} <= set(metrics)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
