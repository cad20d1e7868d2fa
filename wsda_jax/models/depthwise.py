"""The 3x3 depthwise convolution of the MiT encoder's Mix-FFN and DAFormer's fusion.

One filter per channel, padding = dilation (size kept), written as nine shifted
multiply-adds: XLA:CPU runs the grouped convolution (`feature_group_count = C`) and its
gradient 20-40x slower (`wsda_jax.tools.benchmarks.model --arch=daformer`,
docs/benchmarks.md). The gradient is JAX's own: a written-out one (custom_vjp) computed
the incoming gradient once instead of nine times, but its parameter cotangents clash
with shard_map's replication types (check_vma) inside the train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _shifted_sum(x: jax.Array, kernel: jax.Array, bias: jax.Array, dilation: int) -> jax.Array:
    """sum_ij pad(x)[:, i*d:i*d+H, j*d:j*d+W] * kernel[i, j, 0] + bias, summed in at least
    float32, returned in x's dtype."""
    height, width = x.shape[1:3]
    d = dilation
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    padded = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
    out = bias.astype(acc_dtype)
    for i in range(3):
        for j in range(3):
            shifted = padded[:, i * d : i * d + height, j * d : j * d + width, :]
            out = out + shifted.astype(acc_dtype) * kernel[i, j, 0].astype(acc_dtype)
    return out.astype(x.dtype)


# The backward pass recomputes the nine float32 taps from x rather than keeping them: kept,
# they are 9 float32 copies of x per convolution (18x a bfloat16 x), which made them most
# of DAFormer's saved activations (docs/aot.md).
_recomputed_shifted_sum = jax.checkpoint(_shifted_sum, static_argnums=(3,))


def depthwise_conv3x3(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, dilation: int = 1
) -> jax.Array:
    """3x3 depthwise convolution with bias, padding = dilation.

    x: `[B, H, W, C]`; kernel: `[3, 3, 1, C]` (nn.Conv's grouped layout); bias: `[C]`.
    Returns `[B, H, W, C]` in x's dtype; equal to `depthwise_conv3x3_grouped`.
    """
    return _recomputed_shifted_sum(x, kernel, bias, dilation)


def depthwise_conv3x3_grouped(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, dilation: int = 1
) -> jax.Array:
    """`depthwise_conv3x3` as one convolution with `feature_group_count = C`."""
    out = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), ((dilation, dilation), (dilation, dilation)),
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )  # fmt: skip
    return out + bias.astype(x.dtype)
