"""Stage 2 on the synthetic pair with image-level labels.

Embedded procedural dataset (128x256 images, generated into data.data_dir on first use),
ResNet-18 with one block per stage, width 16, 96x192 crops, 600 steps of batch 4 + 4:
sized for a 2-core laptop CPU.
`synthetic_image.py:tiny` is the few-step variant the tests run.

Run configs/synthetic_source_only.py first; its workdir initialises student and teacher.

Command:
  python -m wsda_jax.main --config=configs/synthetic_image.py \
      --workdir=runs/synthetic_image \
      --config.init.init_from=runs/synthetic_source_only

DAFormer's recipe, one stage from scratch on a small MiT (docs/daformer.md):
  python -m wsda_jax.main --config=configs/synthetic_image.py:daformer \
      --workdir=runs/synthetic_image_daformer

Expected runtime of the first command: 4.1 min on an idle 2-core x86_64 CPU (seed 2,
start-up and compile included). The minutes per run in the study's results differ: one
process there compiles once for all its runs, and two runs share the CPU.
Expected result (target val mIoU, mean ± std over seeds): README "Results on the synthetic
domains"; each finished run's numbers are in docs/results/synthetic/.
"""

from __future__ import annotations

import ml_collections

from wsda_jax import config_presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='tiny'` shrinks it to a few steps for tests, 'daformer' is
    DAFormer's one-stage recipe on a small MiT ('daformer,tiny' both)."""
    return config_presets.synthetic(stage="adapt", weak_label="image", arg=arg)
