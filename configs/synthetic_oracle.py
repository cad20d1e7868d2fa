"""Supervised upper bound: the synthetic target's fine labels, no adaptation.

Embedded procedural dataset (128x256 images, generated into data.data_dir on first use),
ResNet-18 with one block per stage, width 16, 96x192 crops, 1200 steps of batch 4
(as many steps as stage 1 + stage 2 of the adapted variants): sized for a 2-core
laptop CPU.
`synthetic_oracle.py:tiny` is the few-step variant the tests run.

Command:
  python -m wsda_jax.main --config=configs/synthetic_oracle.py \
      --workdir=runs/synthetic_oracle

Expected runtime of the command above: 3.0 min on an idle 2-core x86_64 CPU (seed 2,
start-up and compile included). The minutes per run in the study's results differ: one
process there compiles once for all its runs, and two runs share the CPU.
Expected result (target val mIoU, mean ± std over seeds): README "Results on the synthetic
domains"; each finished run's numbers are in docs/results/synthetic/.
"""

from __future__ import annotations

import ml_collections

from wsda_jax import config_presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; `arg='tiny'` shrinks it to a few steps for tests, 'mit' trains
    the small MiT + DAFormer head of the 'daformer' variants instead of the ResNet-18."""
    return config_presets.synthetic(stage="oracle", weak_label="none", arg=arg)
