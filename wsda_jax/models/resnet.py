"""ResNet backbone (torchvision layout, NHWC) with output stride 8 for DeepLabV2.

The module tree mirrors torchvision's `resnet{18,34,50,101}` so that a torchvision
state dict maps one-to-one onto the Flax variables (see `imagenet_init.py`):

    conv1, bn1, layer{1..4}_{i}/{conv1,bn1,conv2,bn2[,conv3,bn3][,downsample_conv,
    downsample_bn]}

Output stride 8 is the DeepLabV2 rule (docs/method.md §3): layer3 and layer4
keep stride 1 and every 3x3 conv in them is dilated by 2 and 4 respectively
(padding = dilation). For an `[B, H, W, 3]` input the output is
`[B, ceil(H/8), ceil(W/8), 8 * width * expansion]`.

For XLA:CPU speed, 1x1 convs are matrix products (`Conv1x1`), with nn.Conv's
parameter shapes and the same maths.

Rematerialisation (`remat`, from `config.model.remat`) trades compute for activation
memory in the backward pass: 'blocks' wraps each residual block in `nn.remat` (only the
block inputs are kept, everything inside is recomputed); 'conv_outputs' also wraps each
block but keeps the outputs of its convolutions (tagged `CONV_OUTPUT` with
`checkpoint_name`), so only the cheap BatchNorm and ReLU are recomputed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BOTTLENECK_DEPTHS = (50, 101)
# Stride and dilation of each stage: output stride 8, DeepLabV2 style.
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

REMAT_MODES = ("none", "blocks", "conv_outputs")
# The name of every backbone convolution output, saved by the 'conv_outputs' policy.
CONV_OUTPUT = "conv_output"


def stage_sizes_for(depth: int, stage_sizes: Sequence[int] = ()) -> tuple[int, ...]:
    """Blocks per stage: `stage_sizes` if given, else the standard ones for `depth`."""
    if depth not in STAGE_SIZES:
        raise ValueError(f"depth={depth}: expected one of {tuple(STAGE_SIZES)}")
    if stage_sizes:
        if len(stage_sizes) != 4 or any(int(n) < 1 for n in stage_sizes):
            raise ValueError(f"stage_sizes={tuple(stage_sizes)}: expected four positive ints")
        return tuple(int(n) for n in stage_sizes)
    return STAGE_SIZES[depth]


class Conv1x1(nn.Module):
    """A 1x1 convolution written as a matrix product over channels.

    XLA:CPU runs a dot faster than the equivalent 1x1 convolution (measured in
    `wsda_jax.tools.benchmarks.model`). The kernel keeps nn.Conv's `[1, 1, in, out]`
    shape and name so checkpoints and the torchvision conversion do not care.
    Stride s takes pixels (s*i, s*j), like torch's 1x1 conv with padding 0; a strided
    one stays a convolution (one layer, layer2's downsample, at output stride 8).
    """

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.strides > 1:
            # A strided convolution, not a strided slice feeding a dot: XLA:GPU (jax 0.10.2)
            # aborts the process compiling a dot whose operand is a fused strided slice, in
            # its Triton GEMM fusion pass (docs/aot.md "The Triton failures").
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.strides, self.strides), "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )  # fmt: skip
        else:
            y = jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])
        return checkpoint_name(y, CONV_OUTPUT)


def conv3x3(
    x: jax.Array, features: int, strides: int, dilation: int, dtype: Any, name: str
) -> jax.Array:
    """3x3 conv of `x` without bias, torch padding (= dilation on each side); the output
    is tagged `CONV_OUTPUT`. Called inside a block's compact `__call__`."""
    conv = nn.Conv(
        features,
        (3, 3),
        strides=strides,
        padding=((dilation, dilation), (dilation, dilation)),
        kernel_dilation=dilation,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        name=name,
    )
    return checkpoint_name(conv(x), CONV_OUTPUT)


def block_class(block_cls: type[nn.Module], remat: str) -> type[nn.Module]:
    """`block_cls`, wrapped in `nn.remat` with the policy of `remat` (see module doc)."""
    if remat == "none":
        return block_cls
    if remat == "blocks":
        return nn.remat(block_cls)
    if remat == "conv_outputs":
        policy = jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT)
        return nn.remat(block_cls, policy=policy)
    raise ValueError(f"remat={remat!r}: expected one of {REMAT_MODES}")


class BasicBlock(nn.Module):
    """torchvision BasicBlock (ResNet-18/34): two 3x3 convs plus identity/projection."""

    features: int
    strides: int
    dilation: int
    norm: Any
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = conv3x3(x, self.features, self.strides, self.dilation, self.dtype, "conv1")
        out = nn.relu(self.norm(name="bn1")(out))
        out = conv3x3(out, self.features, 1, self.dilation, self.dtype, "conv2")
        out = self.norm(name="bn2")(out)
        return nn.relu(out + shortcut(x, self.features, self.strides, self.norm, self.dtype))


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5: stride on the 3x3 conv), expansion 4."""

    features: int
    strides: int
    dilation: int
    norm: Any
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = Conv1x1(self.features, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = conv3x3(out, self.features, self.strides, self.dilation, self.dtype, "conv2")
        out = nn.relu(self.norm(name="bn2")(out))
        out = Conv1x1(self.features * 4, dtype=self.dtype, name="conv3")(out)
        out = self.norm(name="bn3")(out)
        return nn.relu(out + shortcut(x, self.features * 4, self.strides, self.norm, self.dtype))


def shortcut(x: jax.Array, features: int, strides: int, norm: Any, dtype: Any) -> jax.Array:
    """Identity, or torchvision's `downsample` (1x1 conv + BN) when the shape changes.

    Called inside a block's compact `__call__`, so the submodules belong to the block.
    """
    if strides == 1 and x.shape[-1] == features:
        return x
    x = Conv1x1(features, strides=strides, dtype=dtype, name="downsample_conv")(x)
    return norm(name="downsample_bn")(x)


class ResNet(nn.Module):
    """torchvision ResNet without avgpool/fc, output stride 8.

    Attributes:
      depth: 18, 34 (basic blocks), 50 or 101 (bottleneck blocks).
      width: stem channels (64 in torchvision); stage widths are width * (1, 2, 4, 8).
      stage_sizes: blocks per stage, () = the depth's standard sizes.
      bn_axis_name: mesh axis over which BatchNorm statistics are averaged
        (under shard_map), None on one device.
      dtype: compute dtype (float32 or bfloat16); parameters stay float32.
      remat: 'none', 'blocks' or 'conv_outputs' (see the module docstring).
    """

    depth: int = 101
    width: int = 64
    stage_sizes: Sequence[int] = ()
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps images `[B, H, W, 3]` to features `[B, ceil(H/8), ceil(W/8), C_out]`.

        `C_out` = 8 * width (basic) or 32 * width (bottleneck); dtype = `self.dtype`.
        In train mode BatchNorm uses (and updates) batch statistics.
        """
        sizes = stage_sizes_for(self.depth, self.stage_sizes)
        block_cls = Bottleneck if self.depth in BOTTLENECK_DEPTHS else BasicBlock
        block_cls = block_class(block_cls, self.remat)
        # torch defaults: eps 1e-5, momentum 0.1 (== flax momentum 0.9).
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            axis_name=self.bn_axis_name,
        )

        x = x.astype(self.dtype)
        x = nn.Conv(
            self.width,
            (7, 7),
            strides=2,
            padding=((3, 3), (3, 3)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_init,
            name="conv1",
        )(x)
        x = nn.relu(norm(name="bn1")(x))
        # Padding with -inf, as torch's MaxPool2d(3, 2, 1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(sizes):
            for i in range(num_blocks):
                x = block_cls(
                    self.width * 2**stage,
                    strides=STAGE_STRIDES[stage] if i == 0 else 1,
                    dilation=STAGE_DILATIONS[stage],
                    norm=norm,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{i}",
                )(x)
        return x
