"""The model section of the configuration: which values each architecture accepts.

`config.model.arch` picks the network (`models.deeplab.build_model`): 'deeplabv2' (the
reference's DeepLabV2-ResNet, output stride 8) or 'daformer' (a MiT encoder with the
DAFormer decoder, output stride 4, whose encoder's last stage has stride 32).
`validate_model` is part of `config_lib.validate`: one-line ValueErrors naming the key.
"""

from __future__ import annotations

import ml_collections

ARCHS = ("deeplabv2", "daformer")
DEPTHS = (18, 34, 50, 101)
# Rematerialisation modes of each architecture's encoder (models.resnet.REMAT_MODES,
# models.mix_transformer: per transformer block).
REMAT_MODES = {"deeplabv2": ("none", "blocks", "conv_outputs"), "daformer": ("none", "blocks")}
MIT_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5")
# Attention heads of the four MiT stages (every variant): embed_dims must divide by them.
MIT_HEADS = (1, 2, 5, 8)
# What the crop's sides must be multiples of: the stride of the encoder's last stage.
CROP_MULTIPLE = {"deeplabv2": 8, "daformer": 32}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_mit(model: ml_collections.ConfigDict) -> None:
    if model.mit not in MIT_VARIANTS:
        raise ValueError(f"config.model.mit={model.mit!r}: expected one of {MIT_VARIANTS}")
    dims = tuple(model.mit_embed_dims)
    if dims and not (
        len(dims) == 4
        and all(_is_int(d) and d > 0 and d % h == 0 for d, h in zip(dims, MIT_HEADS, strict=True))
    ):
        raise ValueError(
            f"config.model.mit_embed_dims={dims!r}: () for the variant's, or four positive "
            f"integers divisible by the stages' attention heads {MIT_HEADS}"
        )
    depths = tuple(model.mit_depths)
    if depths and not (len(depths) == 4 and all(_is_int(d) and d > 0 for d in depths)):
        raise ValueError(
            f"config.model.mit_depths={depths!r}: () for the variant's, or four positive "
            "integers (blocks per stage)"
        )


def model_name(config: ml_collections.ConfigDict) -> str:
    """The network in words, for tables and logs: 'ResNet-101 w64' or 'MiT-B5 + DAFormer
    head d256' (a MiT with explicit widths: 'MiT widths (16, 32, 80, 128) + ...')."""
    model = config.model
    if model.arch == "daformer":
        dims = tuple(model.mit_embed_dims)
        encoder = f"MiT widths {dims}" if dims else f"MiT-{model.mit.upper()}"
        return f"{encoder} + DAFormer head d{model.decoder_dim}"
    return f"ResNet-{model.depth} w{model.width}"


def validate_model(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError for a model section (with the crop size it needs)
    that cannot be built; numeric ranges are checked in `config_ranges.validate_ranges`."""
    model = config.model
    if model.arch not in ARCHS:
        raise ValueError(f"config.model.arch={model.arch!r}: expected one of {ARCHS}")
    if model.arch == "deeplabv2" and model.depth not in DEPTHS:
        raise ValueError(f"config.model.depth={model.depth}: expected one of {DEPTHS}")
    dilations = tuple(model.aspp_dilations)
    if model.arch == "deeplabv2" and not (
        dilations and all(_is_int(d) and d > 0 for d in dilations)
    ):
        raise ValueError(
            f"config.model.aspp_dilations={dilations!r}: one or more positive integers "
            "(one ASPP branch each)"
        )
    if model.arch == "daformer":
        _check_mit(model)
    modes = REMAT_MODES[model.arch]
    if model.remat not in modes:
        raise ValueError(
            f"config.model.remat={model.remat!r}: expected one of {modes} (arch {model.arch!r})"
        )
    multiple = CROP_MULTIPLE[model.arch]
    height, width = config.data.crop_size
    least = max(16, multiple)
    if height < least or width < least or height % multiple or width % multiple:
        what = "the output stride 8" if model.arch == "deeplabv2" else "32 (MiT's last stride)"
        raise ValueError(
            f"config.data.crop_size={tuple(config.data.crop_size)}: both sides must be "
            f"multiples of {what} and at least {least}"
        )
    ignored = config.pseudo.ignore_top + config.pseudo.ignore_bottom
    if config.stage == "adapt" and ignored >= height:
        raise ValueError(
            f"config.pseudo.ignore_top + config.pseudo.ignore_bottom = {ignored} rows leave "
            f"no row of the {height}-row crop (config.data.crop_size) for pseudo labels; "
            "lower them (the reference's 15 and 120 are for 512-row crops)"
        )
