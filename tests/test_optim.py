"""Tests of wsda_jax.optim: the schedule, weight decay on kernels only, 10x head lr."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wsda_jax import config_lib, optim


def _config():
    config = config_lib.base_config()
    config.optim.lr = 0.01
    config.optim.warmup_steps = 10
    config.num_steps = 100
    config.optim.power = 0.9
    return config


def test_schedule_values():
    schedule = optim.learning_rate_schedule(_config())
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), 0.005, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 0.01 * 0.9**0.9, rtol=1e-6)
    np.testing.assert_allclose(schedule(50), 0.01 * 0.5**0.9, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 0.0, atol=1e-12)
    np.testing.assert_allclose(schedule(150), 0.0, atol=1e-12)


def _params():
    return {
        "backbone": {"conv": {"kernel": jnp.ones((3,))}, "bn": {"scale": jnp.ones((3,))}},
        "head": {"dense": {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))}},
    }


def test_sgd_matches_torch_rule():
    """Two steps by hand: g' = g + wd*p (kernels), buf = m*buf + g', p -= lr_group * buf."""
    config = _config()
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.1  # Large enough to see in the comparison below.
    tx = optim.make_optimizer(config)
    params = _params()
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
    lr = optim.learning_rate_schedule(config)
    wd, m = config.optim.weight_decay, config.optim.momentum

    expected = jax.tree.map(np.asarray, params)
    bufs = jax.tree.map(np.zeros_like, expected)
    for step in range(2):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for group, mult in (("backbone", 1.0), ("head", 10.0)):
            for module, leaves in expected[group].items():
                for name, p in leaves.items():
                    g = 0.5 + (wd * p if name == "kernel" else 0.0)
                    bufs[group][module][name] = m * bufs[group][module][name] + g
                    leaves[name] = p - mult * float(lr(step)) * bufs[group][module][name]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, expected)
    # Weight decay only on kernels, head 10x: the two differ from the no-decay leaves.
    assert not np.allclose(params["backbone"]["conv"]["kernel"], params["backbone"]["bn"]["scale"])
    head_step = 1.0 - params["head"]["dense"]["bias"]
    backbone_step = 1.0 - params["backbone"]["bn"]["scale"]
    np.testing.assert_allclose(head_step, 10.0 * backbone_step, rtol=1e-5)


def _closed_form(step, lr, warmup, num_steps, power):
    """The reference's WarmUpPolyLR, written out."""
    if step < warmup:
        return lr * step / warmup
    return lr * max(1.0 - step / num_steps, 0.0) ** power


@pytest.mark.parametrize(
    "warmup, num_steps", [(1500, 150_000), (50, 600), (0, 600), (0, 1), (1, 4), (10, 10), (20, 10)]
)
def test_optax_schedule_is_the_closed_form(warmup, num_steps):
    """At 0, around the boundary, in between and past the end, warm-up 0 included."""
    config = _config()
    config.optim.warmup_steps, config.num_steps, config.optim.lr = warmup, num_steps, 2.5e-3
    schedule = optim.learning_rate_schedule(config)
    points = {0, 1, warmup - 1, warmup, warmup + 1, num_steps // 3, num_steps - 1, num_steps}
    points |= {num_steps + 7, (warmup + num_steps) // 2}
    for step in sorted(p for p in points if p >= 0):
        expected = _closed_form(step, 2.5e-3, warmup, num_steps, 0.9)
        got = float(schedule(jnp.int32(step)))
        # float32: 1 - step / num_steps loses digits near the end, so an absolute
        # tolerance of float32's resolution at lr as well.
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6 * 2.5e-3, err_msg=str(step))


def _adamw_config(warmup=1500, num_steps=40_000):
    config = config_lib.base_config()
    config.optim.name = "adamw"
    config.optim.lr, config.optim.power, config.optim.weight_decay = 6e-5, 1.0, 0.01
    config.optim.warmup_steps, config.optim.warmup_ratio = warmup, 1e-6
    config.num_steps = num_steps
    return config


def _mmcv_closed_form(i, base, warmup, ratio, num_steps, power):
    """mmcv 1.3 PolyLrUpdaterHook (min_lr 0) with get_warmup_lr('linear'), written out."""
    regular = base * (1.0 - i / num_steps) ** power if i < num_steps else 0.0
    if i >= warmup:
        return regular
    k = (1.0 - i / warmup) * (1.0 - ratio)
    return regular * (1.0 - k)


@pytest.mark.parametrize("warmup, num_steps", [(1500, 40_000), (50, 600), (0, 600), (10, 10)])
def test_adamw_schedule_is_mmcv_closed_form(warmup, num_steps):
    config = _adamw_config(warmup, num_steps)
    schedule = optim.learning_rate_schedule(config)
    points = {0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, num_steps // 2, num_steps - 1}
    points |= {num_steps, num_steps + 3}
    for step in sorted(p for p in points if p >= 0):
        expected = _mmcv_closed_form(step, 6e-5, warmup, 1e-6, num_steps, 1.0)
        got = float(schedule(jnp.int32(step)))
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6 * 6e-5, err_msg=str(step))
    if warmup == 1500:  # DAFormer's numbers: 6e-11 at the first step, the peak after warm-up.
        np.testing.assert_allclose(float(schedule(0)), 6e-11, rtol=1e-5)
        np.testing.assert_allclose(float(schedule(1500)), 6e-5 * (1 - 1500 / 40_000), rtol=1e-6)


def _mixed_params():
    """Backbone: a LayerNorm-like and a dense module; head: a BatchNorm-like and a conv."""
    return {
        "backbone": {
            "block_0": {
                "norm1": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 0.5)},
                "fc": {"kernel": jnp.full((3, 3), 1.5), "bias": jnp.full((3,), -1.0)},
            },
            "norm": {"scale": jnp.full((3,), 3.0), "bias": jnp.full((3,), 1.0)},
        },
        "head": {
            "bn": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 0.25)},
            "conv": {"kernel": jnp.full((1, 1, 3, 3), 1.0), "bias": jnp.full((3,), 1.0)},
        },
    }


_NO_DECAY = {("backbone", "block_0", "norm1"), ("backbone", "norm")}


def test_norm_decay_mask():
    """Only the backbone's normalisation layers (modules with a 'scale') leave the decay."""
    mask = optim.norm_decay_mask(_mixed_params())
    for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]:
        module = tuple(k.key for k in path[:-1])
        assert value == (module not in _NO_DECAY), path


def test_adamw_matches_torch_rule():
    """Two AdamW steps against the torch update written out in NumPy: decoupled decay
    p <- p - lr * wd * p except on backbone norms, Adam with bias correction, head 10x."""
    config = _adamw_config(warmup=0, num_steps=100)
    config.optim.lr, config.optim.weight_decay = 1e-2, 0.1
    tx = optim.make_optimizer(config)
    params = _mixed_params()
    state = tx.init(params)
    rng = np.random.default_rng(0)
    grads_per_step = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        for _ in range(2)
    ]
    b1, b2, eps = 0.9, 0.999, 1e-8
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    expected = [np.asarray(p, np.float64) for _, p in flat]
    m = [np.zeros_like(p) for p in expected]
    v = [np.zeros_like(p) for p in expected]
    for step, grads in enumerate(grads_per_step):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        g_flat = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
        for i, (path, _) in enumerate(flat):
            keys = tuple(k.key for k in path)
            lr = 1e-2 * (1 - step / 100) * (10.0 if keys[0] == "head" else 1.0)
            wd = 0.0 if keys[:-1] in _NO_DECAY else 0.1
            m[i] = b1 * m[i] + (1 - b1) * g_flat[i]
            v[i] = b2 * v[i] + (1 - b2) * g_flat[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** (step + 1)), v[i] / (1 - b2 ** (step + 1))
            expected[i] = expected[i] * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)
        got = jax.tree.leaves(params)
        for i, (path, _) in enumerate(flat):
            np.testing.assert_allclose(got[i], expected[i], rtol=1e-5, atol=1e-5, err_msg=str(path))


def test_set_schedule_step_leaves_adam_count():
    """A skipped step moves the schedule, not Adam's bias-correction count."""
    tx = optim.make_optimizer(_adamw_config(warmup=0, num_steps=100))
    state = optim.set_schedule_step(tx.init(_mixed_params()), jnp.int32(7))
    counts = {}
    for path, leaf in optax.tree_utils.tree_get_all_with_path(state, "count"):
        counts.setdefault(path[-1].tuple_name, set()).add(int(leaf))
    assert counts == {"ScaleByAdamState": {0}, "ScaleByScheduleState": {7}}


def test_sgd_is_the_default_and_unchanged():
    """The default optimizer is SGD: its state has momentum traces, no Adam moments."""
    config = _config()
    assert config.optim.name == "sgd"
    state = optim.make_optimizer(config).init(_params())
    assert optax.tree_utils.tree_get_all_with_path(state, "trace")
    assert not optax.tree_utils.tree_get_all_with_path(state, "mu")


def test_norm_decay_mask_on_mit_is_mmcv_name_rule():
    """On the DAFormer model (tiny MiT), the leaves without decay are exactly those whose
    name holds 'norm' and not 'head' (mmcv's custom_keys order: head before norm); the
    names follow NVlabs' (`block1.norm1`, stacked over stage 1's blocks; `patch_embed1.norm`,
    `attn.norm`, `norm4`)."""
    from wsda_jax import config_presets
    from wsda_jax.models import deeplab

    config = config_presets.synthetic("adapt", "coarse", "daformer,tiny")
    model = deeplab.build_model(config)
    params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 64, 3)), train=False)
    )["params"]
    mask = optim.norm_decay_mask(params)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    names = {".".join(k.key for k in path): decay for path, decay in flat}
    by_name_rule = {n for n in names if "norm" in n and "head" not in n}
    assert {n for n, decay in names.items() if not decay} == by_name_rule
    assert len(by_name_rule) == 38  # 4 patch embeds, 4 stage norms, 4 blocks x 2, 3 sr norms.
    assert names["head.bottleneck.bn.scale"]  # The head's BatchNorms keep the decay.
