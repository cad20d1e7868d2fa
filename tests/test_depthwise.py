"""The shifted multiply-add depthwise convolution equals the grouped convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsda_jax.models import depthwise


@pytest.mark.parametrize("dilation", [1, 6])
def test_shifted_equals_grouped_with_gradients(dilation):
    """Forward and the written-out gradient (x, kernel, bias) equal XLA's grouped,
    dilated convolution and its derived gradient."""
    rng = np.random.default_rng(dilation)
    x = jnp.asarray(rng.normal(size=(2, 9, 13, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 6)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(fn):
        return lambda *args: jnp.sum(jnp.sin(fn(*args, dilation)) * cotangent)

    np.testing.assert_allclose(
        depthwise.depthwise_conv3x3(x, kernel, bias, dilation),
        depthwise.depthwise_conv3x3_grouped(x, kernel, bias, dilation),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    ours = jax.grad(loss(depthwise.depthwise_conv3x3), argnums=(0, 1, 2))(x, kernel, bias)
    grouped = jax.grad(loss(depthwise.depthwise_conv3x3_grouped), argnums=(0, 1, 2))(
        x, kernel, bias
    )
    for got, want in zip(ours, grouped, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gradients_keep_their_inputs_dtypes():
    """bfloat16 activations with float32 parameters: each gradient in its input's dtype."""
    x = jnp.ones((1, 5, 7, 4), jnp.bfloat16)
    kernel, bias = jnp.ones((3, 3, 1, 4)), jnp.zeros((4,))
    grads = jax.grad(
        lambda *a: jnp.sum(depthwise.depthwise_conv3x3(*a).astype(jnp.float32)), argnums=(0, 1, 2)
    )(x, kernel, bias)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]


def residual_bytes(fn, *args) -> int:
    """Bytes the gradient of `fn` keeps from the forward pass (the vjp's residuals)."""
    _, vjp = jax.vjp(fn, *args)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))


def test_gradient_keeps_only_the_inputs():
    """The backward pass recomputes the float32 taps: it keeps x, kernel and bias, not
    nine float32 copies of a bfloat16 x (18x its size, most of DAFormer's activations)."""
    x = jnp.ones((2, 16, 16, 32), jnp.bfloat16)
    kernel, bias = jnp.ones((3, 3, 1, 32)), jnp.zeros((32,))
    kept = residual_bytes(lambda *a: depthwise.depthwise_conv3x3(*a, 6), x, kernel, bias)
    assert kept <= x.nbytes + kernel.nbytes + bias.nbytes
    taps = residual_bytes(lambda *a: depthwise._shifted_sum(*a, 6), x, kernel, bias)
    assert taps >= 9 * 2 * x.nbytes  # Without the checkpoint (the check can fail).


def test_replicated_parameters_get_the_summed_gradient_under_shard_map():
    """With device-varying activations and replicated kernel and bias (the train step's
    case, check_vma on), the written-out gradient is accepted and equals the derived one
    of the grouped convolution."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 7, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    P = jax.sharding.PartitionSpec

    def grads(fn):
        def per_device(x, kernel, bias):
            loss = lambda k, b: jnp.sum(jnp.sin(fn(x, k, b, 2)))  # noqa: E731
            return jax.grad(loss, argnums=(0, 1))(kernel, bias)

        sharded = jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=(P(), P())
        )
        return jax.jit(sharded)(x, kernel, bias)

    ours, grouped = grads(depthwise.depthwise_conv3x3), grads(depthwise.depthwise_conv3x3_grouped)
    for got, want in zip(ours, grouped, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
