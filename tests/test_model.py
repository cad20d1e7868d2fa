"""DeepLabV2 / ResNet: shapes, dtypes, variable tree, BatchNorm modes, errors."""

import functools
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from wsda_jax import config_lib, cpu_flags
from wsda_jax.models import deeplab, resnet

NUM_CLASSES = 3
PROJ_DIM = 8


def normal(seed, shape):
    """Host-drawn float32 normals (eager jax.random compiles slowly on XLA:CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def tiny_model(**kwargs):
    args = dict(num_classes=NUM_CLASSES, depth=50, width=4, proj_dim=PROJ_DIM)
    args.update(stage_sizes=(1, 1, 1, 1))
    args.update(kwargs)
    return deeplab.DeepLabV2(**args)


def variable_shapes(model, shape=(1, 32, 32, 3)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def random_variables(model, seed=0):
    """Random variables from the model's shapes on the host.

    Avoids compiling `model.init` (random-number compiles are slow on XLA:CPU).
    """
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(variable_shapes(model))
    out = {}
    for path, leaf in flat.items():
        name = path[-1]
        if name == "kernel":
            value = rng.standard_normal(leaf.shape) * np.sqrt(1.0 / np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(leaf.shape)
        out[path] = jnp.asarray(value, jnp.float32)
    return flax.traverse_util.unflatten_dict(out)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def apply(model, variables, images, train):
    return model.apply(variables, images, train=train, mutable=["batch_stats"])


@pytest.fixture(scope="module")
def model_and_variables():
    model = tiny_model()
    return model, random_variables(model)


def test_variable_tree():
    shapes = variable_shapes(tiny_model(dtype=jnp.bfloat16))
    assert set(shapes) == {"params", "batch_stats"}
    assert set(shapes["params"]) == {"backbone", "head"}
    assert set(shapes["batch_stats"]) == {"backbone"}
    assert set(shapes["params"]["head"]) == {f"classifier_{i}" for i in range(4)} | {"projection"}
    # Parameters stay float32 under bfloat16 compute.
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(shapes)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    backbone = shapes["params"]["backbone"]
    assert backbone["conv1"]["kernel"].shape == (7, 7, 3, 4)
    # Bottleneck v1.5 widths and the projection shortcut of each stage.
    assert backbone["layer4_0"]["conv2"]["kernel"].shape == (3, 3, 32, 32)
    assert backbone["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)


def test_standard_stage_sizes():
    shapes = variable_shapes(tiny_model(depth=101, stage_sizes=()))
    blocks = [k for k in shapes["params"]["backbone"] if k.startswith("layer3_")]
    assert len(blocks) == 23
    shapes = variable_shapes(tiny_model(depth=34, stage_sizes=()))
    blocks = [k for k in shapes["params"]["backbone"] if k.startswith("layer2_")]
    assert len(blocks) == 4
    assert "conv3" not in shapes["params"]["backbone"]["layer2_0"]


@pytest.mark.parametrize("height,width", [(32, 32), (36, 44)])
def test_output_shapes_and_unit_features(model_and_variables, height, width):
    model, variables = model_and_variables
    images = normal(1, (2, height, width, 3))
    out, _ = apply(model, variables, images, train=False)
    h, w = -(-height // 8), -(-width // 8)
    assert out.features.shape == (2, h, w, PROJ_DIM)
    assert out.lowres_logits.shape == (2, h, w, NUM_CLASSES)
    assert out.logits.shape == (2, height, width, NUM_CLASSES)
    norms = np.linalg.norm(np.asarray(out.features), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # Full-res logits = bilinear upsampling (half-pixel centres), computed here by NumPy.
    upsampled = ref.bilinear_resize(np.asarray(out.lowres_logits), height, width)
    np.testing.assert_allclose(out.logits, upsampled, rtol=1e-5, atol=1e-5)
    # Different images get different outputs (the network is not degenerate).
    assert np.abs(np.asarray(out.lowres_logits[0] - out.lowres_logits[1])).max() > 1e-3


def test_bfloat16_outputs_are_float32_and_close(model_and_variables):
    model, variables = model_and_variables
    model16 = model.clone(dtype=jnp.bfloat16)
    images = normal(2, (2, 32, 32, 3))
    out32, _ = apply(model, variables, images, train=False)
    out16, _ = apply(model16, variables, images, train=False)
    for name in ("features", "lowres_logits", "logits"):
        assert getattr(out16, name).dtype == jnp.float32, name
    # bfloat16 has ~3 significant digits; errors compound through the blocks.
    err = np.linalg.norm(out16.lowres_logits - out32.lowres_logits)
    assert err / np.linalg.norm(out32.lowres_logits) < 0.1


def test_batch_stats_update_only_in_train_mode(model_and_variables):
    model, variables = model_and_variables
    images = 2.0 + normal(3, (2, 32, 32, 3))
    out_eval, upd_eval = apply(model, variables, images, train=False)
    out_train, upd_train = apply(model, variables, images, train=True)
    old = variables["batch_stats"]["backbone"]["bn1"]
    jax.tree.map(np.testing.assert_array_equal, upd_eval["batch_stats"], variables["batch_stats"])
    new = upd_train["batch_stats"]["backbone"]["bn1"]
    # Running mean moves 10% of the way to the batch mean (torch momentum 0.1).
    conv = jax.lax.conv_general_dilated(
        images,
        variables["params"]["backbone"]["conv1"]["kernel"],
        (2, 2),
        ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    batch_mean = conv.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * batch_mean, atol=1e-4)
    assert not np.allclose(out_train.lowres_logits, out_eval.lowres_logits)


def test_bn_statistics_sync_over_axis(model_and_variables):
    """With bn_axis_name, per-shard batch statistics equal the full-batch ones."""
    model, variables = model_and_variables
    # Same shape as in the test above, so the unsynced apply is already compiled.
    images = 2.0 + normal(3, (2, 32, 32, 3))
    synced = model.clone(bn_axis_name="shards")
    per_shard = jax.vmap(
        lambda x: synced.apply(variables, x, train=True, mutable=["batch_stats"]),
        axis_name="shards",
    )
    out_sync, upd_sync = jax.jit(per_shard)(images.reshape(2, 1, 32, 32, 3))
    out_full, upd_full = apply(model, variables, images, train=True)
    np.testing.assert_allclose(
        out_sync.lowres_logits.reshape(out_full.lowres_logits.shape),
        out_full.lowres_logits,
        rtol=1e-4,
        atol=1e-4,
    )
    got = upd_sync["batch_stats"]["backbone"]["layer3_0"]["bn2"]["var"][0]
    want = upd_full["batch_stats"]["backbone"]["layer3_0"]["bn2"]["var"]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="depth"):
        variable_shapes(tiny_model(depth=42))
    with pytest.raises(ValueError, match="images"):
        variable_shapes(tiny_model(), shape=(32, 32, 3))
    with pytest.raises(ValueError, match="images"):
        variable_shapes(tiny_model(), shape=(1, 32, 32, 4))
    with pytest.raises(ValueError, match="stage_sizes"):
        variable_shapes(tiny_model(stage_sizes=(1, 1, 1)))


def test_build_model_from_config():
    config = config_lib.base_config()
    config.model.depth = 18
    config.model.width = 8
    config.model.stage_sizes = (1, 1, 1, 1)
    config.num_classes = 5
    config.compute_dtype = "bfloat16"
    model = deeplab.build_model(config, bn_axis_name="data")
    assert isinstance(model.depth, int) and model.depth == 18
    assert (model.width, model.num_classes, model.proj_dim) == (8, 5, 256)
    assert tuple(model.aspp_dilations) == (12, 24, 36, 48)
    assert model.bn_axis_name == "data" and model.dtype == jnp.bfloat16
    shapes = variable_shapes(model)
    assert shapes["params"]["head"]["classifier_0"]["kernel"].shape == (3, 3, 64, 5)
    config.compute_dtype = "float16"
    with pytest.raises(ValueError, match="compute_dtype"):
        deeplab.build_model(config)


def test_resnet_output_stride_and_channels():
    for depth, channels in ((18, 64), (50, 256)):
        out = jax.eval_shape(
            lambda d=depth: resnet.ResNet(
                depth=d, width=8, stage_sizes=(1, 1, 1, 1)
            ).init_with_output(jax.random.key(0), jnp.zeros((1, 65, 17, 3)), train=False)[0]
        )
        assert out.shape == (1, 9, 3, channels)


def test_cpu_flags_keep_user_settings(monkeypatch):
    flags = ("--xla_cpu_a=1", "--xla_cpu_b=x,y")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_b=mine --other=2")
    result = cpu_flags.apply_cpu_defaults(flags)
    assert result.split() == ["--xla_cpu_b=mine", "--other=2", "--xla_cpu_a=1"]
    assert os.environ["XLA_FLAGS"] == result
    monkeypatch.delenv("XLA_FLAGS")
    assert cpu_flags.apply_cpu_defaults(flags).split() == list(flags)


@pytest.mark.parametrize("remat", ["blocks", "conv_outputs"])
def test_remat_keeps_loss_gradients_and_statistics(model_and_variables, remat):
    """Rematerialisation recomputes activations in the backward pass but changes no
    number: the loss, every gradient and the BatchNorm updates match `remat='none'`."""
    model, variables = model_and_variables
    images = normal(7, (2, 32, 32, 3))

    def loss_and_grads(net):
        def loss_fn(params):
            out, updates = net.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = jnp.mean(jnp.square(out.logits)) + jnp.mean(out.features[..., 0])
            return loss, updates["batch_stats"]

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        jaxpr = str(jax.make_jaxpr(loss_fn)(variables["params"]))
        return jax.jit(grad_fn)(variables["params"]), jaxpr

    ((loss, stats), grads), plain = loss_and_grads(model)
    ((loss_r, stats_r), grads_r), jaxpr = loss_and_grads(model.clone(remat=remat))
    # The four blocks really are rematerialised (jax.checkpoint is `remat2` in a jaxpr),
    # 'conv_outputs' with a policy...
    assert "remat2[" not in plain
    assert jaxpr.count("remat2[") == 4
    assert ("policy=None" in jaxpr) == (remat == "blocks")
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)  # ...and nothing else changes.
    # Recomputation lets XLA fuse and order float32 sums differently: ~4e-7 absolute
    # on gradients of size ~0.1 (a wrong residual would be off by O(1)).
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, grads_r, grads)
    jax.tree.map(close, stats_r, stats)


def test_unknown_remat_is_named():
    with pytest.raises(ValueError, match="remat='layers'"):
        variable_shapes(tiny_model(remat="layers"))
