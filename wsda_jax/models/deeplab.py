"""DeepLabV2 with a projection head (docs/method.md §3).

`backbone` is the output-stride-8 ResNet; `head` holds the DeepLabV2 classifier
(four parallel dilated 3x3 convs, summed) and the 1x1 projection to L2-normalised
pixel features. The split matters: the optimizer gives `head` 10x the learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wsda_jax.models import resnet


def l2_normalize(features: jax.Array) -> jax.Array:
    """`[..., D]` over the last axis as torch's F.normalize: x / max(||x||, 1e-12)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
    return features / jnp.maximum(norm, 1e-12)


@flax.struct.dataclass
class SegmentationOutput:
    """Model outputs, all float32.

    features: `[B, h, w, proj_dim]`, unit L2 norm over the last axis.
    lowres_logits: `[B, h, w, C]` at the model's output stride s: h = ceil(H/s),
      w = ceil(W/s); s = 8 for DeepLabV2, 4 for DAFormer.
    logits: `[B, H, W, C]`, bilinear upsampling of `lowres_logits` to the input size.
    """

    features: jax.Array
    lowres_logits: jax.Array
    logits: jax.Array


class Head(nn.Module):
    """DeepLabV2 classifier plus projection head on the backbone output.

    Returns `(lowres_logits [B, h, w, C], features [B, h, w, proj_dim])`, float32,
    features L2-normalised over channels.
    """

    num_classes: int
    proj_dim: int = 256
    aspp_dilations: Sequence[int] = (12, 24, 36, 48)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        # float32 for float32/bfloat16 compute, float64 for float64 (the parity test).
        out_dtype = jnp.promote_types(self.dtype, jnp.float32)
        logits = jnp.zeros((), out_dtype)
        for i, d in enumerate(self.aspp_dilations):
            # The reference initialises these with normal(0, 0.01) and bias 0. The branches
            # are summed in float32: in bfloat16 (8 significant bits) the sum of four
            # branches would round away what the smaller ones add.
            branch = nn.Conv(
                self.num_classes,
                (3, 3),
                padding=((d, d), (d, d)),
                kernel_dilation=d,
                use_bias=True,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(0.01),
                bias_init=nn.initializers.zeros,
                name=f"classifier_{i}",
            )(x)
            logits = logits + branch.astype(out_dtype)
        features = nn.Dense(
            self.proj_dim, dtype=self.dtype, param_dtype=jnp.float32, name="projection"
        )(x)
        return logits, l2_normalize(features.astype(out_dtype))


class DeepLabV2(nn.Module):
    """ResNet backbone (output stride 8) + DeepLabV2 classifier + projection head.

    Variables: {'params': {'backbone', 'head'}, 'batch_stats': {'backbone'}}.
    """

    num_classes: int
    depth: int = 101
    width: int = 64
    proj_dim: int = 256
    aspp_dilations: Sequence[int] = (12, 24, 36, 48)
    stage_sizes: Sequence[int] = ()
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    remat: str = "none"  # Backbone rematerialisation, see resnet.py.

    def setup(self):
        self.backbone = resnet.ResNet(
            depth=self.depth,
            width=self.width,
            stage_sizes=tuple(self.stage_sizes),
            bn_axis_name=self.bn_axis_name,
            dtype=self.dtype,
            remat=self.remat,
        )
        self.head = Head(
            self.num_classes,
            proj_dim=self.proj_dim,
            aspp_dilations=tuple(self.aspp_dilations),
            dtype=self.dtype,
        )

    def encode(self, images: jax.Array, train: bool) -> jax.Array:
        """The encoder's last feature map: the ResNet output `[B, ceil(H/8), ceil(W/8), C]`
        (dtype `self.dtype`); needs only the 'backbone' variables."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected shape [B, H, W, 3], got {images.shape}")
        return self.backbone(images, train=train)

    def __call__(
        self, images: jax.Array, train: bool, stochastic: bool | None = None
    ) -> SegmentationOutput:
        """Segments ImageNet-normalised images `[B, H, W, 3]` (float).

        `train` switches BatchNorm to batch statistics (apply with
        `mutable=['batch_stats']` to get the updated running statistics).
        `stochastic` is the models' shared switch for dropout and drop path
        (`train_forward`); DeepLabV2 has neither, so it changes nothing here.
        """
        x = self.encode(images, train)
        lowres_logits, features = self.head(x)
        batch, height, width = images.shape[:3]
        logits = jax.image.resize(
            lowres_logits, (batch, height, width, self.num_classes), method="bilinear"
        )
        return SegmentationOutput(features=features, lowres_logits=lowres_logits, logits=logits)


ARCHS = ("deeplabv2", "daformer")


def build_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> nn.Module:
    """The model of `config.model.arch`: `DeepLabV2` (the reference) or
    `daformer_head.DAFormer`, from `config.model.*` (remat included), `config.num_classes`
    and `config.compute_dtype`. Both return `SegmentationOutput` and hold params
    {'backbone', 'head'}."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.compute_dtype not in dtypes:
        raise ValueError(f"config.compute_dtype={config.compute_dtype!r}: float32 or bfloat16")
    arch = config.model.arch
    if arch == "daformer":
        # Imported here: daformer_head imports this module (SegmentationOutput).
        from wsda_jax.models import daformer_head

        return daformer_head.DAFormer(
            num_classes=config.num_classes,
            variant=config.model.mit,
            embed_dims=tuple(config.model.mit_embed_dims),
            depths=tuple(config.model.mit_depths),
            drop_path_rate=config.model.drop_path_rate,
            decoder_dim=config.model.decoder_dim,
            proj_dim=config.model.proj_dim,
            bn_axis_name=bn_axis_name,
            dtype=dtypes[config.compute_dtype],
            remat=config.model.remat,
            unroll=config.model.mit_unroll,
        )
    if arch != "deeplabv2":
        raise ValueError(f"config.model.arch={arch!r}: expected one of {ARCHS}")
    return DeepLabV2(
        num_classes=config.num_classes,
        depth=config.model.depth,
        width=config.model.width,
        proj_dim=config.model.proj_dim,
        aspp_dilations=tuple(config.model.aspp_dilations),
        stage_sizes=tuple(config.model.stage_sizes),
        bn_axis_name=bn_axis_name,
        dtype=dtypes[config.compute_dtype],
        remat=config.model.remat,
    )


def train_forward(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    dropout_key: jax.Array | None = None,
) -> tuple[SegmentationOutput, Any]:
    """Train-mode forward (batch statistics, running statistics updated).

    Args:
      images: float32 [B, H, W, 3], ImageNet-normalised.
      dropout_key: the student's key for dropout and drop path (DAFormer); None runs
        without them, as the EMA teacher does (DAFormer's teacher sets them to eval).
    Returns:
      (SegmentationOutput, the updated batch_stats).
    """
    out, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        stochastic=dropout_key is not None,
        rngs={} if dropout_key is None else {"dropout": dropout_key},
        mutable=["batch_stats"],
    )
    return out, updates["batch_stats"]
