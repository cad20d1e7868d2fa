"""Shared builders of the experiment configs in `configs/`.

`reference(...)` keeps the reference's hyper-parameters (`config_lib.base_config()`,
docs/method.md §4-12) and only sets the source, stage and weak label.
`synthetic(...)` scales everything down so a run on the embedded procedural dataset
finishes on a 2-core laptop CPU in minutes; its `tiny` variant shrinks it further to a
handful of steps for the end-to-end tests and the device check.
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
# SYNTHIA's are 1280x760, where DAFormer keeps 3000.
_MIC_BLOCK_SIZE = 32
_RCS_MIN_PIXELS, _RCS_IMAGE_AREA = 3000, 1914 * 1052


def _scaled_block_size(crop_height: int) -> int:
    return max(1, round(_MIC_BLOCK_SIZE * crop_height / _REFERENCE_CROP_HEIGHT))


def _scaled_min_pixels(height: int, width: int) -> int:
    return round(_RCS_MIN_PIXELS * height * width / _RCS_IMAGE_AREA)


def reference(source: str, stage: str, weak_label: str) -> ml_collections.ConfigDict:
    """Returns the reference hyper-parameters for `source` -> Cityscapes."""
    config = config_lib.base_config()
    config.data.source = source
    config.data.target = "cityscapes_weak"
    config.stage = stage
    config.weak_label = weak_label
    if source == "synthia":  # Not resized at preparation: DAFormer's count as it is.
        config.data.rare_class_sampling.min_pixels = _RCS_MIN_PIXELS
    return config


def _scaled_rows(rows: int, height: int) -> int:
    return max(1, round(rows * height / _REFERENCE_CROP_HEIGHT))


def synthetic(stage: str, weak_label: str, arg: str | None) -> ml_collections.ConfigDict:
    """Returns a laptop-sized config on the synthetic dataset; `arg='tiny'` for tests."""
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown config variant {arg!r}: expected nothing or 'tiny'")
    config = config_lib.base_config()
    config.stage = stage
    config.weak_label = weak_label
    config.data.source = "synthetic_source"
    config.data.target = "synthetic_target"
    config.data.synthetic.height = 128
    config.data.synthetic.width = 256
    config.data.crop_size = (96, 192)
    config.data.scale_range = (0.75, 1.5)
    config.data.num_workers = -1  # The host's choice: none below 4 cores (README "Input pipeline").

    config.model.depth = 18
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.width = 16
    config.model.proj_dim = 64
    config.model.aspp_dilations = (3, 6)

    config.num_steps = 600
    config.per_device_batch_size = 4
    config.loss.contrast_start = 200
    # The reference's 0.999 averages over ~1,000 of its 150,000 steps; over 600 steps
    # it would leave the teacher (the pseudo-label source) close to its initialisation.
    config.ema.decay = 0.99
    config.optim.lr = 1e-2
    config.optim.warmup_steps = 50
    config.pseudo.ignore_top = _scaled_rows(config.pseudo.ignore_top, 96)
    config.pseudo.ignore_bottom = _scaled_rows(config.pseudo.ignore_bottom, 96)
    config.mic.block_size = _scaled_block_size(96)  # 6 px: a 16 x 32 grid on 96x192 crops.
    config.data.rare_class_sampling.min_pixels = _scaled_min_pixels(128, 256)  # 49 px.

    config.eval.every_steps = 200
    config.eval.per_device_batch_size = 8
    config.eval.max_images = 100
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2

    if arg == "tiny":
        _shrink_to_tiny(config)
    return config


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
    config.loss.contrast_start = 2  # So the contrastive branch runs within the test.
    config.loss.max_views = 4
    config.loss.inter_max_samples = 64
    config.loss.intra_max_samples = 32
    config.optim.warmup_steps = 1
    config.pseudo.ignore_top = _scaled_rows(15, 32)
    config.pseudo.ignore_bottom = _scaled_rows(120, 32)
    config.mic.block_size = _scaled_block_size(32)  # 2 px.
    config.data.rare_class_sampling.min_pixels = _scaled_min_pixels(32, 64)  # 3 px.

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
