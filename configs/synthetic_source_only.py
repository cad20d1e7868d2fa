"""Stage 1 on the synthetic source domain only (the lower bound and stage-2 init).

Embedded procedural dataset (128x256 images, generated into data.data_dir on first use),
ResNet-18 with one block per stage, width 16, 96x192 crops, 600 steps of batch 4 + 4:
sized for a 2-core laptop CPU.
`synthetic_source_only.py:tiny` is the few-step variant the tests run.

Command:
  python -m wsda_jax.main --config=configs/synthetic_source_only.py \
      --workdir=runs/synthetic_source_only

Expected runtime of the command above: 1.6 min on an idle 2-core x86_64 CPU (seed 2,
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
    return config_presets.synthetic(stage="source_only", weak_label="none", arg=arg)
