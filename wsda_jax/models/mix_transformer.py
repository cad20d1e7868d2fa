"""Mix Transformer (MiT-B0..B5, the SegFormer encoder), NHWC, and its NVlabs weights.

Four stages; stage s embeds its input with an overlapping strided convolution
(7x7 stride 4 for stage 1, 3x3 stride 2 after) and LayerNorm, runs `depths[s]`
transformer blocks and a final LayerNorm. A block is pre-norm:

    x = x + drop_path(attention(norm1(x)));  x = x + drop_path(mix_ffn(norm2(x)))

The attention is efficient self-attention: keys and values come from the input
shrunk by a k=s=`SR_RATIOS[s]` convolution and LayerNorm (stride 8, 4, 2, 1), so stage 1's
`(H/4)(W/4)` queries attend to `(H/32)(W/32)` keys. Mix-FFN is fc1 (4x wider), a 3x3
depthwise convolution with bias, exact GELU and fc2. Stochastic depth grows linearly
from 0 to `drop_path_rate` over all blocks (timm's per-sample DropPath).

LayerNorm epsilons as the original: 1e-6 in the blocks (norm1, norm2) and the stage
norms, torch's default 1e-5 in the patch embeddings and the attention's reduction norm.

Each stage runs its blocks as one `nn.scan` (a loop in the compiled program, not
`depths[s]` copies of the block): MiT-B5's 52 blocks otherwise make the train step a
program XLA takes about an hour to compile on two cores (docs/aot.md). A stage's block
parameters are therefore stacked along a leading axis: `block{s}/...` of shape
`[depths[s], ...]`.

The module tree mirrors the NVlabs / DAFormer key names one-to-one
(`variables_from_state_dict`) once the stacks are split per block (`unstack_blocks`):
`patch_embed{s}/{proj,norm}`, `block{s}_{i}/{norm1, attn/{q,kv,sr,norm,proj},norm2,
mlp/{fc1,dwconv,fc2}}`, `norm{s}`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from wsda_jax.models import depthwise

# Variant -> (embed dims, blocks per stage), as NVlabs' mit_b0..mit_b5.
VARIANTS = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
BLOCK_NORM_EPS = 1e-6  # The variants' norm_layer: block norm1/norm2 and the stage norms.
TORCH_NORM_EPS = 1e-5  # nn.LayerNorm's default: patch embeddings, attention reduction norm.
REMAT_MODES = ("none", "blocks")
# Keys of the NVlabs ImageNet checkpoints that the encoder has no place for (the classifier).
IGNORED_KEYS = ("head.weight", "head.bias")
BLOCK_STACK = re.compile(r"block\d")  # A stage's blocks, stacked: params 'block3'.
UNSTACKED_BLOCK = re.compile(r"(block\d)_(\d+)")  # One block of `unstack_blocks`: 'block3_12'.

# timm's trunc_normal_(std=.02) truncates at +-2 (absolute), i.e. 100 std: a plain normal.
dense_init = nn.initializers.normal(0.02)


def conv_init(kernel_size: int, features: int, groups: int = 1) -> Any:
    """The original's conv init: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups."""
    return nn.initializers.normal(math.sqrt(2.0 * groups / (kernel_size**2 * features)))


def stage_settings(
    variant: str, embed_dims: Sequence[int] | None = None, depths: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(embed dims, depths) of `variant`, either overridden; raises ValueError if invalid."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {tuple(VARIANTS)}")
    dims = tuple(int(d) for d in (embed_dims or VARIANTS[variant][0]))
    blocks = tuple(int(n) for n in (depths or VARIANTS[variant][1]))
    if len(dims) != 4 or any(d < 1 or d % h for d, h in zip(dims, NUM_HEADS, strict=True)):
        raise ValueError(f"embed_dims={dims}: expected four positive multiples of {NUM_HEADS}")
    if len(blocks) != 4 or any(n < 1 for n in blocks):
        raise ValueError(f"depths={blocks}: expected four positive ints")
    return dims, blocks


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v per head, in the inputs' dtype.

    q: `[B, T, N, d]`; k, v: `[B, S, N, d]`; returns `[B, T, N, d]`.
    """
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    return jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU where it applies).

    Its XLA form always takes the softmax in float32, so float64 (the parity tests)
    uses `explicit_attention` instead. Shapes as `explicit_attention`.
    """
    if q.dtype == jnp.float64:
        return explicit_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v)


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Keeps each sample's `x` with probability 1 - rate, scaled by 1 / (1 - rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def layer_norm(epsilon: float, dtype: Any, name: str) -> nn.LayerNorm:
    """torch's LayerNorm: two-pass variance (not E[x^2] - E[x]^2), float32 parameters."""
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name
    )


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
    """torch's Linear (with bias), the original's init."""
    return nn.Dense(
        features, dtype=dtype, param_dtype=jnp.float32, kernel_init=dense_init, name=name
    )


class DepthwiseConv3x3(nn.Module):
    """`[B, H, W, C] -> [B, H, W, C]`; parameters `kernel [3, 3, 1, C]`, `bias [C]`."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", conv_init(3, channels, channels), (3, 3, 1, channels))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        return depthwise.depthwise_conv3x3(x.astype(self.dtype), kernel, bias)


class OverlapPatchEmbed(nn.Module):
    """Conv (k x k, stride s, padding k // 2) + LayerNorm: `[B, H, W, C_in]` ->
    `[B, ceil(H/s), ceil(W/s), features]`."""

    features: int
    kernel_size: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.stride,
            padding=((pad, pad), (pad, pad)),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_init(self.kernel_size, self.features),
            name="proj",
        )(x)
        return layer_norm(TORCH_NORM_EPS, self.dtype, "norm")(x)


class Attention(nn.Module):
    """Efficient self-attention: `[B, H, W, C] -> [B, H, W, C]`.

    Keys and values come from the input reduced by a k=s=`sr_ratio` conv (dropping
    the remainder rows/columns, as torch's unpadded conv) and LayerNorm. `kv`'s output
    channels are [k | v], each head-major, as the original's reshape (B, S, 2, heads, d).
    """

    num_heads: int
    sr_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, dim = x.shape
        head_dim = dim // self.num_heads
        q = dense(dim, self.dtype, "q")(x).reshape(batch, -1, self.num_heads, head_dim)
        if self.sr_ratio > 1:
            r = self.sr_ratio
            x = nn.Conv(
                dim, (r, r), strides=r, padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=conv_init(r, dim), name="sr",
            )(x)  # fmt: skip
            x = layer_norm(TORCH_NORM_EPS, self.dtype, "norm")(x)
        kv = dense(2 * dim, self.dtype, "kv")(x).reshape(batch, -1, 2, self.num_heads, head_dim)
        out = attention(q, kv[:, :, 0], kv[:, :, 1]).reshape(batch, height, width, dim)
        return dense(dim, self.dtype, "proj")(out)


class MixFFN(nn.Module):
    """fc1 (C -> hidden), 3x3 depthwise conv, exact GELU, fc2: `[B, H, W, C]` in and out."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = dense(self.hidden, self.dtype, "fc1")(x)
        x = DepthwiseConv3x3(self.dtype, name="dwconv")(x)
        x = nn.gelu(x, approximate=False)
        return dense(dim, self.dtype, "fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block: `[B, H, W, C] -> [B, H, W, C]`.

    Attributes:
      stochastic_depth: draw drop-path masks (rng stream 'dropout') at the rate given
        to the call; False in eval and when the model's `drop_path_rate` is 0.
    """

    num_heads: int
    sr_ratio: int
    stochastic_depth: bool = False
    dtype: Any = jnp.float32

    def _residual(self, x: jax.Array, y: jax.Array, rate: jax.Array) -> jax.Array:
        if self.stochastic_depth:
            y = drop_path(y, rate, self.make_rng("dropout"))
        return x + y

    @nn.compact
    def __call__(self, x: jax.Array, drop_path_rate: jax.Array | float = 0.0) -> jax.Array:
        dim = x.shape[-1]
        attn = Attention(self.num_heads, self.sr_ratio, self.dtype, name="attn")
        y = layer_norm(BLOCK_NORM_EPS, self.dtype, "norm1")(x)
        x = self._residual(x, attn(y), drop_path_rate)
        y = layer_norm(BLOCK_NORM_EPS, self.dtype, "norm2")(x)
        mlp = MixFFN(MLP_RATIO * dim, self.dtype, name="mlp")
        return self._residual(x, mlp(y), drop_path_rate)


def _block_step(block: Block, x: jax.Array, rate: jax.Array) -> tuple[jax.Array, None]:
    """One iteration of a stage's scan over its blocks."""
    return block(x, rate), None


class MixTransformer(nn.Module):
    """MiT encoder. Variables: 'params' only (LayerNorm, no batch statistics).

    Attributes:
      variant: 'b0'..'b5' (depths and widths of `VARIANTS`).
      embed_dims, depths: overrides of the variant's (tiny test models); heads and
        reduction ratios stay (1, 2, 5, 8) and (8, 4, 2, 1).
      drop_path_rate: stochastic depth of the last block (DAFormer: 0.1).
      dtype: compute dtype (float32, bfloat16; float64 for parity); parameters float32.
      remat: 'none' or 'blocks' (recompute each transformer block in the backward pass).
      unroll: each stage's blocks as straight-line code rather than one loop: the same
        function and parameters, a program XLA compiles far slower, but whose cost
        analysis counts every block (it counts a loop's body once).
    """

    variant: str = "b0"
    embed_dims: Sequence[int] | None = None
    depths: Sequence[int] | None = None
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    remat: str = "none"
    unroll: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> list[jax.Array]:
        """Images `[B, H, W, 3]` -> four `[B, ceil(H/s), ceil(W/s), embed_dims[i]]` maps at
        strides s = 4, 8, 16, 32, dtype `self.dtype`. Train mode draws stochastic depth
        from the 'dropout' rng stream when `drop_path_rate` > 0."""
        dims, depths = stage_settings(self.variant, self.embed_dims, self.depths)
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_MODES}")
        block_cls = nn.remat(Block) if self.remat == "blocks" else Block
        rates = np.linspace(0.0, self.drop_path_rate, sum(depths), dtype=np.float32)
        first_block = np.cumsum((0,) + depths)
        x = images.astype(self.dtype)
        outputs = []
        for s in range(4):
            kernel_size, stride = (7, 4) if s == 0 else (3, 2)
            x = OverlapPatchEmbed(
                dims[s], kernel_size, stride, self.dtype, name=f"patch_embed{s + 1}"
            )(x)
            blocks = nn.scan(
                _block_step,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=depths[s],
                unroll=self.unroll,  # True: every iteration written out; False: a loop.
            )
            block = block_cls(
                NUM_HEADS[s],
                SR_RATIOS[s],
                stochastic_depth=train and self.drop_path_rate > 0.0,
                dtype=self.dtype,
                name=f"block{s + 1}",
            )
            x, _ = blocks(block, x, jnp.asarray(rates[first_block[s] : first_block[s + 1]]))
            x = layer_norm(BLOCK_NORM_EPS, self.dtype, f"norm{s + 1}")(x)
            outputs.append(x)
        return outputs


# ----- NVlabs / DAFormer state dicts -----


def torch_key(path: tuple[str, ...]) -> str:
    """Param path in `unstack_blocks`' view -> NVlabs key, e.g. ('block1_0', 'mlp', 'dwconv',
    'kernel') -> 'block1.0.mlp.dwconv.dwconv.weight', ('norm1', 'scale') -> 'norm1.weight'."""
    *modules, leaf = path
    names = [m.replace("_", ".") if m.startswith("block") else m for m in modules]
    if modules[-1] == "dwconv":
        names.append("dwconv")  # The original wraps its conv in a DWConv module.
    return ".".join(names + ["bias" if leaf == "bias" else "weight"])


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Torch shape of a Flax leaf: conv HWIO -> OIHW, dense (in, out) -> (out, in)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def to_flax(value: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout (inverse of `torch_shape`), float32."""
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def _first(keys: Sequence[str], what: str) -> str:
    return f"{len(keys)} {what} (first: {', '.join(keys[:3])})"


def unstack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """MiT params with each stage's stacked blocks (`block{s}`, leading axis the block)
    split into one subtree per block (`block{s}_{i}`), as NVlabs numbers them."""
    out = {}
    for name, subtree in params.items():
        if BLOCK_STACK.fullmatch(name):
            for i in range(jax.tree.leaves(subtree)[0].shape[0]):
                out[f"{name}_{i}"] = jax.tree.map(lambda a, i=i: a[i], subtree)
        else:
            out[name] = subtree
    return out


def stack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `unstack_blocks`: `block{s}_{i}` subtrees stacked (NumPy) into `block{s}`."""
    out, stages = {}, {}
    for name, subtree in params.items():
        match = UNSTACKED_BLOCK.fullmatch(name)
        if match:
            stages.setdefault(match[1], {})[int(match[2])] = subtree
        else:
            out[name] = subtree
    for name, blocks in stages.items():
        out[name] = jax.tree.map(lambda *a: np.stack(a), *(blocks[i] for i in sorted(blocks)))
    return out


def convert_state_dict(state_dict: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """NVlabs state dict -> MiT params with the structure and shapes of `params`.

    Strict: raises one ValueError naming the first three missing keys, keys the model
    does not use and mis-shaped keys. Only `IGNORED_KEYS` (the ImageNet classifier) may
    be left over. Returns float32 NumPy leaves.
    """
    flat = flax.traverse_util.flatten_dict(jax.eval_shape(unstack_blocks, params))
    expected = {torch_key(path): (path, torch_shape(tuple(v.shape))) for path, v in flat.items()}
    missing = [key for key in expected if key not in state_dict]
    extra = sorted(key for key in state_dict if key not in expected and key not in IGNORED_KEYS)
    misshaped = [
        f"{key} {tuple(np.shape(state_dict[key]))} != {shape}"
        for key, (_, shape) in expected.items()
        if key in state_dict and tuple(np.shape(state_dict[key])) != shape
    ]
    problems = [
        _first(keys, what)
        for keys, what in (
            (missing, "missing keys"),
            (extra, "keys the model does not use"),
            (misshaped, "keys of the wrong shape (found != expected)"),
        )
        if keys
    ]
    if problems:
        raise ValueError("MiT state_dict: " + "; ".join(problems))
    return stack_blocks(
        flax.traverse_util.unflatten_dict(
            {path: to_flax(state_dict[key]) for key, (path, _) in expected.items()}
        )
    )


def variables_from_state_dict(
    state_dict: dict[str, np.ndarray],
    variant: str,
    *,
    embed_dims: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """`{'params': ...}` of `MixTransformer(variant, embed_dims, depths)` from NVlabs keys
    (`patch_embed1.proj.weight`, `block1.0.attn.q.weight`, ...); see `convert_state_dict`."""
    model = MixTransformer(variant=variant, embed_dims=embed_dims, depths=depths)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    return {"params": convert_state_dict(state_dict, shapes["params"])}
