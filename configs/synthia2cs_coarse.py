"""Stage 2, SYNTHIA -> Cityscapes with coarse labels.

Reference hyper-parameters (docs/method.md §4-12): 512x512 crops, 4 + 4 images
per device, 150k steps of SGD. Prepare the datasets first (see the README).

mIoU is reported over 19 classes and over the 16 and 13 SYNTHIA classes.

Command (one host; see launch/ for TPU VMs, several GPUs and SLURM):
  python -m wsda_jax.main --config=configs/synthia2cs_coarse.py \
      --workdir=runs/synthia2cs_coarse \
      --config.init.init_from=runs/synthia_source_only

DAFormer's recipe (one stage from ImageNet weights: MiT-B5 + DAFormer head, AdamW, 40k steps
of 2 + 2 images, rare class sampling, ImageNet feature distance; docs/daformer.md):
  python -m wsda_jax.main --config=configs/synthia2cs_coarse.py:daformer \
      --workdir=runs/synthia2cs_coarse_daformer --config.init.imagenet=/path/to/mit_b5.pth

Expected runtime: not yet measured.
Expected result (Cityscapes val mIoU): not yet measured.
"""

from __future__ import annotations

import ml_collections

from wsda_jax import config_presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='daformer'` for DAFormer's one-stage recipe."""
    return config_presets.reference(source="synthia", stage="adapt", weak_label="coarse", arg=arg)
