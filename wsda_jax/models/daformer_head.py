"""DAFormer: a Mix Transformer encoder with DAFormer's context-aware feature fusion
decoder (Hoyer et al., CVPR 2022) and the method's projection head (docs/method.md §3).

The decoder is DAFormer's `DAFormerHead` in its published configuration
(`daformer_sepaspp_mitb5`): each of the encoder's four levels (strides 4, 8, 16, 32) is
embedded by a Linear layer (no norm, no activation) to `decoder_dim` channels, bilinearly
upsampled to stride 4 (half-pixel centres, torch's align_corners=False), and the four
are concatenated. The fusion is a depthwise-separable ASPP without image pooling:
dilation 1 is a 1x1 conv, dilations 6, 12, 18 each a depthwise 3x3 dilated conv and a
1x1 conv, every conv followed by BatchNorm and ReLU; their concatenation goes through a
3x3 bottleneck conv + BatchNorm + ReLU to the fused `decoder_dim` map. Dropout2d (0.1,
whole channels) and a biased 1x1 conv classify it. The method's projection head (as
`deeplab.Head`'s: a biased 1x1 conv, L2-normalised) reads the same fused map, so
features and prototypes live at stride 4.

The module tree of `head` mirrors mmseg's names (`torch_key`; the table is in
docs/reference_checkpoints.md): embed_{i}, aspp_{j}/[depthwise|pointwise/]{conv,bn},
bottleneck/{conv,bn}, classifier (conv_seg), and projection (not in DAFormer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from wsda_jax.models import deeplab, depthwise, mix_transformer, resnet

# DAFormer's fusion: ASPP dilations (no image-pooling branch) and the classifier's dropout.
FUSION_DILATIONS = (1, 6, 12, 18)
DROPOUT_RATE = 0.1


def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default init of weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class DepthwiseConv3x3(nn.Module):
    """`depthwise.depthwise_conv3x3`, dilated, with parameter `kernel [3, 3, 1, C]` (no
    bias: mmcv's ConvModule before a BatchNorm)."""

    dilation: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (3, 3, 1, x.shape[-1])
        # mmcv's kaiming_init(fan_out, relu): fan_out = C * 9, as for nn.Conv.
        kernel = self.param("kernel", resnet.conv_init, shape, jnp.float32)
        no_bias = jnp.zeros(shape[-1:], jnp.float32)
        return depthwise.depthwise_conv3x3(x.astype(self.dtype), kernel, no_bias, self.dilation)


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule with BatchNorm and ReLU: a conv without bias (`conv`), BatchNorm
    (`bn`, torch's eps 1e-5 and momentum 0.1) and ReLU. `depthwise` makes it one 3x3
    filter per channel (features = input channels, `DepthwiseConv3x3`). Padding keeps
    the size.

    `[B, h, w, C_in]` -> `[B, h, w, features]` in `dtype`.
    """

    features: int
    kernel_size: int = 1
    dilation: int = 1
    depthwise: bool = False
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.kernel_size == 1:
            # A matrix product over channels, as ResNet's 1x1 convs (faster on XLA:CPU).
            x = resnet.Conv1x1(self.features, dtype=self.dtype, name="conv")(x)
        elif self.depthwise:  # 3x3, features = input channels.
            x = DepthwiseConv3x3(self.dilation, self.dtype, name="conv")(x)
        else:
            pad = self.dilation * (self.kernel_size // 2)
            x = nn.Conv(
                self.features,
                (self.kernel_size, self.kernel_size),
                padding=((pad, pad), (pad, pad)),
                kernel_dilation=self.dilation,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=resnet.conv_init,  # mmcv's kaiming_init(fan_out, relu).
                name="conv",
            )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            axis_name=self.bn_axis_name,
            name="bn",
        )(x)
        return nn.relu(x)


class SeparableConvBNReLU(nn.Module):
    """mmcv's DepthwiseSeparableConvModule: a dilated depthwise 3x3 ConvBNReLU
    (`depthwise`) and a 1x1 ConvBNReLU (`pointwise`)."""

    features: int
    dilation: int
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype)
        x = ConvBNReLU(x.shape[-1], 3, self.dilation, depthwise=True, name="depthwise", **common)(
            x, train
        )
        return ConvBNReLU(self.features, name="pointwise", **common)(x, train)


class DAFormerHead(nn.Module):
    """DAFormer's decoder plus the projection head (module docstring).

    Input: the encoder's four levels `[B, ceil(H/s), ceil(W/s), C_s]`, s = 4, 8, 16, 32.
    Returns `(lowres_logits [B, h, w, num_classes], features [B, h, w, proj_dim])`,
    h = ceil(H/4), float32 (float64 under float64 compute), features L2-normalised.

    train: BatchNorm on batch statistics (apply with mutable=['batch_stats']).
    stochastic: Dropout2d on (draws from the 'dropout' rng stream).
    """

    num_classes: int
    decoder_dim: int = 256
    proj_dim: int = 256
    dilations: Sequence[int] = FUSION_DILATIONS
    dropout_rate: float = DROPOUT_RATE
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, levels: Sequence[jax.Array], train: bool, stochastic: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)
        batch, height, width = levels[0].shape[:3]
        embedded = []
        for i, level in enumerate(levels):
            fan_in = level.shape[-1]
            x = nn.Dense(
                self.decoder_dim,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=_torch_linear_init(fan_in),
                name=f"embed_{i}",
            )(level)
            if x.shape[1:3] != (height, width):
                x = jax.image.resize(x, (batch, height, width, self.decoder_dim), method="bilinear")
            embedded.append(x)
        x = jnp.concatenate(embedded, axis=-1)
        common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype)
        branches = []
        for j, dilation in enumerate(self.dilations):
            if dilation == 1:
                branch = ConvBNReLU(self.decoder_dim, name=f"aspp_{j}", **common)
            else:
                branch = SeparableConvBNReLU(self.decoder_dim, dilation, name=f"aspp_{j}", **common)
            branches.append(branch(x, train))
        fused = ConvBNReLU(self.decoder_dim, 3, name="bottleneck", **common)(
            jnp.concatenate(branches, axis=-1), train
        )
        # Dropout2d: whole channels of an image, so the mask broadcasts over h and w.
        dropped = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(
            fused, deterministic=not stochastic
        )
        logits = nn.Conv(
            self.num_classes,
            (1, 1),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(0.01),  # mmseg's init of conv_seg.
            bias_init=nn.initializers.zeros,
            name="classifier",
        )(dropped)
        features = nn.Dense(
            self.proj_dim, dtype=self.dtype, param_dtype=jnp.float32, name="projection"
        )(fused)
        return logits.astype(out_dtype), deeplab.l2_normalize(features.astype(out_dtype))


class DAFormer(nn.Module):
    """MiT encoder (`backbone`) + DAFormer decoder and projection head (`head`).

    Variables: {'params': {'backbone', 'head'}, 'batch_stats': {'head'}} (the encoder
    has LayerNorms only). Outputs at stride 4: `deeplab.SegmentationOutput` with
    features and lowres_logits `[B, ceil(H/4), ceil(W/4), .]`, logits `[B, H, W, C]`
    (bilinear, align_corners=False, as DAFormer resizes its logits).

    variant: MiT 'b0'..'b5'; embed_dims / depths: () = the variant's, else overrides for
    tiny models (see mix_transformer). remat: 'none' or 'blocks' (per transformer block).
    unroll: the encoder's blocks as straight-line code (`MixTransformer.unroll`).
    """

    num_classes: int
    variant: str = "b5"
    embed_dims: Sequence[int] = ()
    depths: Sequence[int] = ()
    drop_path_rate: float = 0.1
    decoder_dim: int = 256
    proj_dim: int = 256
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    remat: str = "none"
    unroll: bool = False

    def setup(self) -> None:
        self.backbone = mix_transformer.MixTransformer(
            variant=self.variant,
            embed_dims=tuple(self.embed_dims) or None,
            depths=tuple(self.depths) or None,
            drop_path_rate=self.drop_path_rate,
            dtype=self.dtype,
            remat=self.remat,
            unroll=self.unroll,
        )
        self.head = DAFormerHead(
            self.num_classes,
            decoder_dim=self.decoder_dim,
            proj_dim=self.proj_dim,
            bn_axis_name=self.bn_axis_name,
            dtype=self.dtype,
        )

    def __call__(
        self, images: jax.Array, train: bool, stochastic: bool | None = None
    ) -> deeplab.SegmentationOutput:
        """Segments ImageNet-normalised images `[B, H, W, 3]` (float).

        train: BatchNorm on batch statistics (apply with mutable=['batch_stats']).
        stochastic: dropout and drop path on, drawing from the 'dropout' rng stream;
          None = `train`. The EMA teacher runs train=True, stochastic=False.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected shape [B, H, W, 3], got {images.shape}")
        stochastic = train if stochastic is None else stochastic
        levels = self.backbone(images, train=stochastic)  # MiT's train = drop path only.
        lowres_logits, features = self.head(levels, train=train, stochastic=stochastic)
        batch, height, width = images.shape[:3]
        logits = jax.image.resize(
            lowres_logits, (batch, height, width, self.num_classes), method="bilinear"
        )
        return deeplab.SegmentationOutput(
            features=features, lowres_logits=lowres_logits, logits=logits
        )

    def encode(self, images: jax.Array, train: bool) -> jax.Array:
        """The encoder's last stage `[B, ceil(H/32), ceil(W/32), C_4]` (MiT stage 4), for
        the ImageNet feature distance; `train` turns drop path on."""
        return self.backbone(images, train=train)[-1]


# ----- DAFormer (mmseg) state dicts -----

# The parts of DAFormer's UDA model in its checkpoints (mmseg `state_dict` prefixes).
UDA_STUDENT, UDA_TEACHER, UDA_IGNORED = "model.", "ema_model.", "imnet_model."
IGNORED_SUFFIX = "num_batches_tracked"
SHOWN_KEYS = 3  # How many offending keys an error names.
# Our BatchNorm leaves -> torch's names; conv and dense leaves: kernel -> weight.
_TORCH_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_key(path: tuple[str, ...]) -> str | None:
    """The mmseg key (under `decode_head.`) of one of our head leaves (params or
    batch_stats), e.g. ('aspp_1', 'depthwise', 'bn', 'mean') ->
    'fuse_layer.aspp_modules.1.depthwise_conv.bn.running_mean'; None for the projection
    head, which DAFormer does not have. Layouts: `mix_transformer.torch_shape`."""
    *modules, leaf = path
    name = "weight" if leaf == "kernel" else _TORCH_LEAF[leaf]
    first = modules[0]
    if first == "projection":
        return None
    if first == "classifier":
        return f"conv_seg.{name}"
    if first.startswith("embed_"):
        return f"embed_layers.{first.split('_')[1]}.proj.{name}"
    if first.startswith("aspp_"):
        inner = [m if m in ("conv", "bn") else f"{m}_conv" for m in modules[1:]]
        return ".".join(["fuse_layer.aspp_modules", first.split("_")[1], *inner, name])
    if first == "bottleneck":
        return f"fuse_layer.bottleneck.{modules[1]}.{name}"
    raise ValueError(f"unexpected DAFormer head leaf {'/'.join(path)}")


def _named(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:SHOWN_KEYS])
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} ({shown}{more})"


def split_uda_state_dict(
    state_dict: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(student, EMA teacher or None) of a DAFormer / MIC UDA state dict (`model.*`,
    `ema_model.*`; `imnet_model.*` dropped); a state dict without `model.*` keys is
    a bare segmentor's: (it, None)."""
    if not any(k.startswith(UDA_STUDENT) for k in state_dict):
        return state_dict, None
    parts = {UDA_STUDENT: {}, UDA_TEACHER: {}}
    unknown = []
    for key, value in state_dict.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None:
            parts[prefix][key[len(prefix) :]] = value
        elif not key.startswith(UDA_IGNORED):
            unknown.append(key)
    if unknown:
        raise ValueError(f"state_dict: keys of no model part {_named(sorted(unknown))}")
    return parts[UDA_STUDENT], parts[UDA_TEACHER] or None


def convert_state_dict(
    state_dict: dict[str, np.ndarray], variables: dict[str, Any], *, name: str = "state_dict"
) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of our DAFormer from an mmseg DAFormer state dict
    (`backbone.*`, `decode_head.*`). The projection head, which DAFormer lacks, is kept
    from `variables`. Strict: one-line ValueErrors naming the first few missing,
    mis-shaped or unknown keys."""
    if any(k.startswith(("decode_head.scale_attention.", "decode_head.head.")) for k in state_dict):
        raise ValueError(
            f"{name}: an HRDA multi-resolution head (decode_head.head.*, "
            "decode_head.scale_attention.*; MIC's released MIC(HRDA) checkpoints): only "
            "DAFormer's single-resolution head is implemented"
        )
    parts = {"backbone.": {}, "decode_head.": {}}
    for key, value in state_dict.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None and not key.endswith(IGNORED_SUFFIX):
            raise ValueError(f"{name}: keys our model does not have {_named([key])}")
        if prefix is not None:
            parts[prefix][key[len(prefix) :]] = value
    try:
        backbone = mix_transformer.convert_state_dict(
            parts["backbone."], variables["params"]["backbone"]
        )
    except ValueError as error:
        raise ValueError(f"{name}: backbone.*: {error}") from error
    head_dict, used, missing, misshaped, out = parts["decode_head."], set(), [], [], {}
    for collection in ("params", "batch_stats"):
        new_flat = {}
        for path, old in flax.traverse_util.flatten_dict(variables[collection]["head"]).items():
            key = torch_key(path)
            if key is None:  # The projection head: none to convert.
                new_flat[path] = np.asarray(old, np.float32)
                continue
            if key not in head_dict:
                missing.append(f"decode_head.{key}")
                continue
            value, expected = head_dict[key], mix_transformer.torch_shape(tuple(old.shape))
            used.add(key)
            if value.shape != expected:
                misshaped.append(f"decode_head.{key} {value.shape}, expected {expected}")
                continue
            new_flat[path] = mix_transformer.to_flax(value)
        out[collection] = {"head": flax.traverse_util.unflatten_dict(new_flat)}
    unknown = sorted(
        f"decode_head.{k}" for k in head_dict if k not in used and not k.endswith(IGNORED_SUFFIX)
    )
    if missing:
        raise ValueError(f"{name}: missing keys {_named(missing)}")
    if misshaped:
        raise ValueError(f"{name}: wrong shapes {_named(misshaped)} (another num_classes?)")
    if unknown:
        raise ValueError(f"{name}: keys our model does not have {_named(unknown)}")
    out["params"]["backbone"] = backbone
    return out
