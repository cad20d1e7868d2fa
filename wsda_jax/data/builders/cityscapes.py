"""Cityscapes with weak labels: the target domain (docs/method.md §1)."""

from __future__ import annotations

import os
from typing import Any

from wsda_jax.data.builders import base, layout

COARSE_SOURCES = ("gt", "synthetic")
# The reference's fixed pre-resize of the train split before augmentation, (height,
# width); val stays 2048x1024.
TRAIN_SIZE = (512, 1024)
IMAGE_SUFFIX = "_leftImg8bit.png"
FINE_SUFFIX = "_gtFine_labelIds.png"
COARSE_SUFFIX = "_gtCoarse_labelIds.png"


class CityscapesWeak(base.WsdaBuilder, skip_registration=True):
    """Cityscapes train (2,975) and val (500) with fine, coarse and point labels.

    Records: image, label (fine, train ids), coarse_label, point_label, presence
    (classes of the fine label), name (e.g. 'aachen_000000_000019').
    - coarse 'gt' (default): `gtCoarse/{split}` labelIds. A split without a
      gtCoarse folder (the val split in some downloads) gets coarse labels
      synthesised from fine, counted as `coarse_synthesised` in the summary;
      within a split that has the folder, every image needs its coarse file.
      coarse 'synthetic': always synthesised from fine (`weak_labels.coarse_from_fine`).
    - points: `points_per_class` pixels per class of the fine label, seeded by
      the image name, at least `point_margin` pixels from class boundaries.
    - `train_size` [height, width] (the configs ask for `TRAIN_SIZE`, 512x1024, as the
      reference): the train split's image (bilinear), fine and coarse labels (nearest)
      are resized at preparation, then the points are drawn at that size; val keeps
      its full size. Part of the name, e.g. 'points1_train1024x512'.
    """

    name = "cityscapes_weak"
    SPLITS = ("train", "val")
    TARGET = True

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "points_per_class": 1,
            "point_margin": 0,
            "coarse": "gt",
            "seed": 0,
            "train_size": None,
        }

    @classmethod
    def config_name(cls, options: dict[str, Any]) -> str:
        if options["coarse"] not in COARSE_SOURCES:
            raise ValueError(f"coarse={options['coarse']!r}: expected one of {COARSE_SOURCES}")
        name = f"points{options['points_per_class']}"
        if options["point_margin"]:
            name += f"_margin{options['point_margin']}"
        if options["seed"]:
            name += f"_seed{options['seed']}"
        name += base.size_suffix(options["train_size"], "_train")
        return name + ("_synthetic_coarse" if options["coarse"] == "synthetic" else "")

    @classmethod
    def expected_layout(cls, options: dict[str, Any]) -> list[str]:
        layout = [
            f"leftImg8bit/{{train,val}}/*/*{IMAGE_SUFFIX}",
            f"gtFine/{{train,val}}/*/*{FINE_SUFFIX}",
        ]
        if options["coarse"] == "gt":
            layout.append(f"gtCoarse/train/*/*{COARSE_SUFFIX}")
        return layout

    def _tasks(self, split: str) -> tuple[Any, list[base.PairTask]]:
        expected = self.expected_layout(self.options)
        images = _by_name(self.manual_dir, f"leftImg8bit/{split}/*/*{IMAGE_SUFFIX}", IMAGE_SUFFIX)
        fine = _by_name(self.manual_dir, f"gtFine/{split}/*/*{FINE_SUFFIX}", FINE_SUFFIX)
        pairs = layout.pair_by_key(self.manual_dir, expected, images, fine, f"cityscapes {split}")
        coarse = {}
        coarse_dir = os.path.join(self.manual_dir, "gtCoarse", split)
        if self.options["coarse"] == "gt" and os.path.isdir(coarse_dir):
            coarse = _by_name(
                self.manual_dir, f"gtCoarse/{split}/*/*{COARSE_SUFFIX}", COARSE_SUFFIX
            )
            missing = sorted(set(images) - set(coarse))
            if missing:
                raise layout.layout_error(
                    self.manual_dir,
                    expected,
                    f"cityscapes {split}: {len(missing)} images lack gtCoarse, e.g. {missing[:3]}",
                )
        elif self.options["coarse"] == "gt" and split == "train":
            raise layout.layout_error(
                self.manual_dir, expected, f"cityscapes train: {coarse_dir} not found"
            )
        weak = base.WeakSpec(
            points_per_class=self.options["points_per_class"],
            point_margin=self.options["point_margin"],
            seed=self.options["seed"],
        )
        label_map = base.LABEL_MAPS["cityscapes"]
        resize_to = base.size_option(self.options["train_size"]) if split == "train" else None
        tasks = [
            base.PairTask(
                key,
                image,
                label,
                label_map,
                coarse_path=coarse.get(key),
                weak=weak,
                resize_to=resize_to,
            )
            for key, image, label in pairs
        ]
        return base.process_pair, tasks


def _by_name(manual_dir: str, pattern: str, suffix: str) -> dict[str, str]:
    return {os.path.basename(p)[: -len(suffix)]: p for p in layout.glob_files(manual_dir, pattern)}
