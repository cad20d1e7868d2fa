"""The embedded procedural street scenes (`wsda_jax.data.synthetic`) as prepared datasets.

The scene size, counts and seed are part of the config name, so changing
config.data.synthetic prepares a new dataset instead of silently reusing one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from wsda_jax.data.builders import base

# Validation scenes use indices from here on, so they never repeat a training scene
# whatever num_target_train is.
VAL_INDEX_OFFSET = 10_000_000
# config.data.synthetic.coarse: 'eroded' (boundaries and small regions erased, so thin
# classes vanish) or 'every_class' (also keeps each class's largest region whole).
COARSE_STYLES = ("eroded", "every_class")


@dataclasses.dataclass(frozen=True)
class RenderTask:
    name: str
    domain: str  # 'source' or 'target'
    index: int
    seed: int
    height: int
    width: int
    weak: base.WeakSpec | None = None


def process_render(task: RenderTask) -> tuple[str, dict[str, Any], dict[str, int]]:
    """Renders one scene (with weak labels for targets). Returns (key, example, counts)."""
    from wsda_jax.data import synthetic  # Imported here: only these builders need it.

    example = synthetic.render_example(
        task.domain, task.index, seed=task.seed, height=task.height, width=task.width
    )
    image = np.asarray(example["image"], np.uint8)
    label = np.asarray(example["label"], np.uint8)
    example, counts = base.finish_example(task.name, image, label, None, task.weak)
    return task.name, example, counts


class _Procedural(base.WsdaBuilder, skip_registration=True):
    NEEDS_MANUAL_DIR = False
    DOMAIN = ""

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {"height": 128, "width": 256, "num_train": 2000, "num_val": 0, "seed": 0}

    @classmethod
    def config_name(cls, options: dict[str, Any]) -> str:
        return (
            f"h{options['height']}_w{options['width']}_train{options['num_train']}"
            f"_val{options['num_val']}_seed{options['seed']}"
        )

    def _weak(self) -> base.WeakSpec | None:
        return None

    def _tasks(self, split: str) -> tuple[Any, list[RenderTask]]:
        count = self.options["num_train"] if split == "train" else self.options["num_val"]
        start = 0 if split == "train" else VAL_INDEX_OFFSET
        tasks = [
            RenderTask(
                name=f"{self.DOMAIN}_{split}_{i:06d}",
                domain=self.DOMAIN,
                index=start + i,
                seed=self.options["seed"],
                height=self.options["height"],
                width=self.options["width"],
                weak=self._weak(),
            )
            for i in range(count)
        ]
        return process_render, tasks


class SyntheticSource(_Procedural, skip_registration=True):
    """Procedural source-domain scenes with dense labels; split 'train'."""

    name = "synthetic_source"
    DOMAIN = "source"


class SyntheticTarget(_Procedural, skip_registration=True):
    """Procedural target-domain scenes: splits 'train' and 'val', with weak labels
    (coarse synthesised from fine, `points_per_class` points, presence)."""

    name = "synthetic_target"
    DOMAIN = "target"
    SPLITS = ("train", "val")
    TARGET = True

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return dict(
            super().default_options(),
            num_train=1000,
            num_val=200,
            points_per_class=1,
            coarse="eroded",
        )

    @classmethod
    def config_name(cls, options: dict[str, Any]) -> str:
        if options["coarse"] not in COARSE_STYLES:
            raise ValueError(f"coarse={options['coarse']!r}: expected one of {COARSE_STYLES}")
        every_class = "_coarse_every_class" if options["coarse"] == "every_class" else ""
        return super().config_name(options) + f"_points{options['points_per_class']}{every_class}"

    def _weak(self) -> base.WeakSpec:
        return base.WeakSpec(
            points_per_class=self.options["points_per_class"],
            seed=self.options["seed"],
            coarse_every_class=self.options["coarse"] == "every_class",
        )
