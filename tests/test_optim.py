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
