"""Shared builders of the experiment configs in `configs/`.

`reference(...)` keeps the reference's hyper-parameters (`config_lib.base_config()`,
docs/method.md §4-12) and only sets the source, stage and weak label.
`synthetic(...)` scales everything down so a run on the embedded procedural dataset
finishes on a 2-core laptop CPU in minutes; its `tiny` variant shrinks it further to a
handful of steps for the end-to-end tests and the device check. The `daformer` variant
of both (`file.py:daformer`, `file.py:daformer,tiny`) is DAFormer's one-stage recipe
with the method's losses on top (docs/daformer.md).
"""

from __future__ import annotations

import ml_collections

from wsda_jax import config_lib

# Reference crops are 512 rows high; the pseudo-label masks of the top 15 and bottom 120
# rows of a crop (docs/method.md §4.6) are scaled to the crop height of smaller configs.
_REFERENCE_CROP_HEIGHT = 512
# Options beyond the reference, scaled the same way. MIC masks 32-px blocks of 512-px
# crops of half-resolution images (1/16 of the crop height; its 64 px are for 1024-px
# crops at full resolution, MIC `seg/experiments.py`). DAFormer's rare class sampling
# counts 3000 pixels of a class in GTA5's 1914x1052 label maps (0.149% of the image);
# SYNTHIA's are 1280x760, where DAFormer keeps 3000. Its crop rule counts 3000 * 0.5
# pixels of the class in a crop of the 1280x720 training image.
_MIC_BLOCK_SIZE = 32
_RCS_MIN_PIXELS, _RCS_IMAGE_AREA = 3000, 1914 * 1052
_RCS_MIN_CROP_PIXELS, _RCS_TRAIN_AREA = 1500, 1280 * 720
# The synthetic `daformer` configs' MiT widths (heads 1, 2, 5, 8 divide them).
SYNTHETIC_MIT_DIMS = (16, 32, 80, 128)


def _scaled_block_size(crop_height: int) -> int:
    return max(1, round(_MIC_BLOCK_SIZE * crop_height / _REFERENCE_CROP_HEIGHT))


def _scale_rare_class_counts(config: ml_collections.ConfigDict, height: int, width: int) -> None:
    """DAFormer's rare-class pixel counts (image filter, crop bound) scaled by area to
    `height x width` source images."""
    rcs = config.data.rare_class_sampling
    rcs.min_pixels = round(_RCS_MIN_PIXELS * height * width / _RCS_IMAGE_AREA)
    rcs.min_crop_pixels = round(_RCS_MIN_CROP_PIXELS * height * width / _RCS_TRAIN_AREA)


def variants(arg: str | None, allowed: tuple[str, ...], stage: str) -> set[str]:
    """The comma-separated config variants of `arg` ('daformer,tiny' -> {'daformer',
    'tiny'}); a one-line ValueError for an unknown one, or for 'daformer' (one-stage
    adaptation) with a stage other than 'adapt'."""
    names = {name.strip() for name in (arg or "").split(",") if name.strip()}
    unknown = sorted(names - set(allowed))
    if unknown:
        known = ", ".join(repr(a) for a in allowed)
        several = " (comma-separated)" if len(allowed) > 1 else ""
        raise ValueError(
            f"unknown config variant {unknown[0]!r}: this config takes {known}{several}, or none"
        )
    if "daformer" in names and stage != "adapt":
        raise ValueError(
            "config variant 'daformer' is DAFormer's one-stage adaptation: use it with an "
            f"adaptation config (stage 'adapt'), not stage {stage!r}"
        )
    return names


def reference(
    source: str, stage: str, weak_label: str, arg: str | None = None
) -> ml_collections.ConfigDict:
    """Returns the reference hyper-parameters for `source` -> Cityscapes; `arg='daformer'`
    for DAFormer's recipe."""
    names = variants(arg, ("daformer",), stage)
    config = config_lib.base_config()
    config.data.source = source
    config.data.target = "cityscapes_weak"
    config.stage = stage
    config.weak_label = weak_label
    if source == "synthia":  # Not resized at preparation: DAFormer's count as it is.
        config.data.rare_class_sampling.min_pixels = _RCS_MIN_PIXELS
    if "daformer" in names:
        daformer(config)
    return config


def daformer(config: ml_collections.ConfigDict) -> None:
    """DAFormer's recipe on a reference config (docs/daformer.md, each value's source
    file there): one-stage adaptation from ImageNet weights with MiT-B5 + DAFormer head,
    AdamW with mmcv's poly schedule, 40k steps of 2 + 2 images, EMA 0.999 reached by
    DAFormer's ramp min(1 - 1/(step + 1), 0.999), rare class sampling with its crop rule,
    the thing-class ImageNet feature distance; pseudo-label threshold 0.968 and the crop
    of the pseudo weights (top 15, bottom 120) are the reference's already. The method's
    weak-label, prototype and contrastive losses stay."""
    config.init.one_stage = True
    _daformer_network_and_optimizer(config)
    config.num_steps = 40_000
    config.per_device_batch_size = 2
    config.ema.decay = 0.999
    config.ema.ramp = True
    config.pseudo.threshold = 0.968
    config.pseudo.ignore_top, config.pseudo.ignore_bottom = 15, 120
    config.data.rare_class_sampling.enabled = True
    config.data.rare_class_sampling.temperature = 0.01
    # min_pixels and min_crop_pixels: the defaults and the synthetic presets scale DAFormer's.
    config.loss.imnet_fd = 0.005
    # One stage: after the 1,500-step warm-up and 2.5 EMA time constants (1,000 steps
    # each at 0.999), when the teacher follows a student trained at the full rate
    # (docs/daformer.md "When the contrastive terms start").
    config.loss.contrast_start = 4000
    config.eval.every_steps = 4000  # DAFormer's evaluation interval.


def _daformer_network_and_optimizer(config: ml_collections.ConfigDict) -> None:
    """MiT-B5 + DAFormer head, AdamW with mmcv's poly schedule (docs/daformer.md)."""
    config.model.arch = "daformer"
    config.model.mit = "b5"
    config.model.drop_path_rate = 0.1
    config.model.decoder_dim = 256
    config.optim.name = "adamw"
    config.optim.lr = 6e-5
    config.optim.betas = (0.9, 0.999)
    config.optim.weight_decay = 0.01
    config.optim.head_lr_mult = 10.0
    config.optim.warmup_steps = 1500
    config.optim.warmup_ratio = 1e-6
    config.optim.power = 1.0


def _scaled_rows(rows: int, height: int) -> int:
    return max(1, round(rows * height / _REFERENCE_CROP_HEIGHT))


def scale_pseudo_margins(config: ml_collections.ConfigDict, height: int) -> None:
    """The reference's pseudo-label row margins (top 15, bottom 120 of its 512-row crops)
    scaled to crops of `height` rows, as the smaller presets and benchmarks need."""
    config.pseudo.ignore_top = _scaled_rows(15, height)
    config.pseudo.ignore_bottom = _scaled_rows(120, height)


def synthetic(stage: str, weak_label: str, arg: str | None) -> ml_collections.ConfigDict:
    """Returns a laptop-sized config on the synthetic dataset; `arg='tiny'` for tests,
    'daformer' (or 'daformer,tiny') for DAFormer's recipe on a small MiT, 'mit' for that
    small MiT and its optimiser in any stage, with the stage's own schedule."""
    names = variants(arg, ("tiny", "daformer", "mit"), stage)
    if {"daformer", "mit"} <= names:
        raise ValueError(
            "config variants 'daformer' and 'mit': choose one ('daformer' has the MiT)"
        )
    config = config_lib.base_config()
    config.stage = stage
    config.weak_label = weak_label
    config.data.source = "synthetic_source"
    config.data.target = "synthetic_target"
    config.data.synthetic.height = 128
    config.data.synthetic.width = 256
    config.data.crop_size = (96, 192)
    config.data.scale_range = (0.75, 1.5)
    # The host's choice: none below 4 cores (docs/benchmarks.md, "Input pipeline").
    config.data.num_workers = -1

    config.model.depth = 18
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.width = 16
    config.model.proj_dim = 64
    config.model.aspp_dilations = (3, 6)

    # The oracle: as many steps as stage 1 + stage 2 of the adapted variants (600 + 600),
    # so the table compares equal training lengths.
    config.num_steps = 1200 if stage == "oracle" else 600
    config.per_device_batch_size = 4
    config.loss.contrast_start = 200
    # The reference's 0.999 averages over ~1,000 of its 150,000 steps; over 600 steps
    # it would leave the teacher (the pseudo-label source) close to its initialisation.
    config.ema.decay = 0.99
    config.optim.lr = 1e-2
    config.optim.warmup_steps = 50
    scale_pseudo_margins(config, 96)
    config.mic.block_size = _scaled_block_size(96)  # 6 px: a 16 x 32 grid on 96x192 crops.
    _scale_rare_class_counts(config, 128, 256)  # 49 px per image, 53 per crop.

    config.eval.every_steps = 200
    config.eval.per_device_batch_size = 8
    config.eval.max_images = 100
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2

    if "daformer" in names:
        _synthetic_daformer(config)
    if "mit" in names:
        _synthetic_mit(config)
    if "tiny" in names:
        _shrink_to_tiny(config)
    return config


def _synthetic_daformer(config: ml_collections.ConfigDict) -> None:
    """`daformer` scaled to the synthetic domains as the other synthetic configs scale
    the reference (batch 4 + 4, EMA 0.99, warm-up 50 steps, learning rate x4, scaled rare
    class sampling and MIC), on a small MiT and a 32-channel decoder (docs/daformer.md:
    the stride-4 decoder costs most of the step on a CPU). No ImageNet weights exist for
    it, so it starts from scratch without the feature distance. One stage of 1,200
    steps: the length of stage 1 + stage 2 of the ResNet-18 runs; the contrastive terms
    start at step 800, after as many steps as in those runs (600 + 200)."""
    daformer(config)
    _synthetic_mit(config)
    config.num_steps = 1200
    config.per_device_batch_size = 4
    config.ema.decay = 0.99
    scale_pseudo_margins(config, 96)
    config.loss.imnet_fd = 0.0
    config.loss.contrast_start = 800
    config.eval.every_steps = 200


def _synthetic_mit(config: ml_collections.ConfigDict) -> None:
    """The synthetic `daformer` variant's network and optimiser: a small MiT (one block
    per stage, widths `SYNTHETIC_MIT_DIMS`) + a 32-channel DAFormer head, AdamW at 4x
    DAFormer's learning rate (batch 4 + 4 as the other synthetic configs) with a 50-step
    warm-up. Alone (`:mit`) it swaps the network of any synthetic stage, e.g. the oracle
    and source-only bounds of that network (docs/daformer.md, the study)."""
    _daformer_network_and_optimizer(config)
    config.model.mit = "b0"
    config.model.mit_embed_dims = SYNTHETIC_MIT_DIMS
    config.model.mit_depths = (1, 1, 1, 1)
    config.model.decoder_dim = 32
    config.optim.lr = 4 * 6e-5
    config.optim.warmup_steps = 50


def _shrink_to_tiny(config: ml_collections.ConfigDict) -> None:
    """A handful of steps of a tiny model on a tiny dataset: seconds, for tests."""
    config.data.synthetic.height = 32
    config.data.synthetic.width = 64
    config.data.synthetic.num_source = 16
    config.data.synthetic.num_target_train = 16
    config.data.synthetic.num_target_val = 8
    config.data.crop_size = (32, 64)
    config.data.num_workers = 0
    config.data.prefetch_buffer_size = 1

    config.model.width = 8
    config.model.proj_dim = 16
    config.model.aspp_dilations = (1, 2)
    # With --config.model.arch=daformer: a MiT-B0 of one narrow block per stage (widths
    # divisible by the heads 1, 2, 5, 8) and a 16-channel decoder.
    config.model.mit = "b0"
    config.model.mit_embed_dims = (8, 8, 10, 16)
    config.model.mit_depths = (1, 1, 1, 1)
    config.model.decoder_dim = 16

    config.num_steps = 4
    # Every term from step 1: one compiled train program per run (the switch at
    # contrast_start is tested with it set, tests/test_train.py, test_contrast_switch.py).
    config.loss.contrast_start = 0
    config.loss.max_views = 4
    config.loss.inter_max_samples = 64
    config.loss.intra_max_samples = 32
    config.optim.warmup_steps = 1
    scale_pseudo_margins(config, 32)
    config.mic.block_size = _scaled_block_size(32)  # 2 px.
    _scale_rare_class_counts(config, 32, 64)  # 3 px per image, 3 per crop.

    config.eval.every_steps = 4
    config.eval.per_device_batch_size = 4
    config.eval.max_images = 8
    config.eval.num_panels = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2


def tiny_step(weak_label: str = "coarse", batch_size: int = 2) -> ml_collections.ConfigDict:
    """The smallest adaptation step with every term on: ResNet-18 (one block per stage,
    width 4), 5 classes, 32x32 crops, contrastive terms from step 0 and thresholds low
    enough that a random teacher is confident. The unit tests and the device check's
    accelerator-vs-CPU comparison run it."""
    config = config_lib.base_config()
    config.num_classes = 5
    config.weak_label = weak_label
    config.per_device_batch_size = batch_size
    config.num_steps = 100
    config.model.depth = 18
    config.model.width = 4
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.proj_dim = 16
    config.model.aspp_dilations = (1, 2)
    config.data.crop_size = (32, 32)
    config.loss.contrast_start = 0
    config.loss.max_views = 2
    config.loss.inter_max_samples = 32
    config.loss.intra_max_samples = 16
    config.pseudo.threshold = 0.2
    config.pseudo.proto_threshold = 0.2
    config.pseudo.ignore_top = 2
    config.pseudo.ignore_bottom = 4
    config.optim.warmup_steps = 0
    config.optim.lr = 1e-2
    return config
