"""GTA5 (Richter et al. 2016): `images/*.png` and `labels/*.png`, labels in Cityscapes labelIds."""

from __future__ import annotations

import os
from typing import Any

from wsda_jax.data.builders import base, layout

SIZE_MISMATCH = ("resize", "skip")
# The reference's fixed pre-resize of GTA5 (1914x1052) before augmentation, (height, width).
TRAIN_SIZE = (720, 1280)


class Gta5(base.WsdaBuilder, skip_registration=True):
    """GTA5 with Cityscapes train ids; split 'train' (24,966 images when complete).

    Some GTA5 images differ in size from their labels: option `size_mismatch`
    'resize' (default) resizes the image (bilinear) to the label, 'skip' drops
    the pair; both are counted in the preparation summary, as are label pixels
    whose id is not a Cityscapes labelId (they become 255).

    Option `train_size` [height, width] (default none here; the configs ask for
    `TRAIN_SIZE`, 720x1280, as the reference) resizes every pair at preparation (image
    bilinear, label nearest) and is part of the dataset's name, e.g. 'resize_1280x720'.
    """

    name = "gta5"

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {"size_mismatch": "resize", "train_size": None}

    @classmethod
    def config_name(cls, options: dict[str, Any]) -> str:
        if options["size_mismatch"] not in SIZE_MISMATCH:
            raise ValueError(
                f"size_mismatch={options['size_mismatch']!r}: expected one of {SIZE_MISMATCH}"
            )
        return options["size_mismatch"] + base.size_suffix(options["train_size"], "_")

    @classmethod
    def expected_layout(cls, options: dict[str, Any]) -> list[str]:
        del options
        return ["images/*.png", "labels/*.png"]

    def _tasks(self, split: str) -> tuple[Any, list[base.PairTask]]:
        del split
        expected = self.expected_layout(self.options)
        images = {_stem(p): p for p in layout.glob_files(self.manual_dir, expected[0])}
        labels = {_stem(p): p for p in layout.glob_files(self.manual_dir, expected[1])}
        pairs = layout.pair_by_key(self.manual_dir, expected, images, labels, "gta5")
        label_map = base.LABEL_MAPS["cityscapes"]
        tasks = [
            base.PairTask(
                key,
                image,
                label,
                label_map,
                size_mismatch=self.options["size_mismatch"],
                resize_to=base.size_option(self.options["train_size"]),
            )
            for key, image, label in pairs
        ]
        return base.process_pair, tasks


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
