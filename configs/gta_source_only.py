"""Stage 1: source-only DeepLabV2/ResNet-101 on GTA5 from ImageNet weights.

Reference hyper-parameters (docs/method.md §4-12): 512x512 crops, 4 + 4 images
per device, 150k steps of SGD. Prepare the datasets first (see the README).

Command (one host; see launch/ for TPU VMs, several GPUs and SLURM):
  python -m wsda_jax.main --config=configs/gta_source_only.py --workdir=runs/gta_source_only \
      --config.init.imagenet=/path/to/resnet101_imagenet.npz

Expected runtime: not yet measured.
Expected result (Cityscapes val mIoU): not yet measured.
"""

from __future__ import annotations

import ml_collections

from wsda_jax import config_presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config (no variant: `daformer` is a one-stage adaptation)."""
    return config_presets.reference(source="gta5", stage="source_only", weak_label="none", arg=arg)
