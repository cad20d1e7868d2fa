"""SYNTHIA-RAND-CITYSCAPES: `RGB/*.png` and 16-bit 3-channel `GT/LABELS/*.png` (id in red)."""

from __future__ import annotations

import os
from typing import Any

from wsda_jax.data.builders import base, layout


class Synthia(base.WsdaBuilder, skip_registration=True):
    """SYNTHIA-RAND-CITYSCAPES with Cityscapes train ids (docs/method.md §2); split 'train'.

    Label ids >= 23 (not SYNTHIA classes) become 255 and are counted.
    """

    name = "synthia"

    @classmethod
    def expected_layout(cls, options: dict[str, Any]) -> list[str]:
        del options
        return ["RGB/*.png", "GT/LABELS/*.png"]

    def _tasks(self, split: str) -> tuple[Any, list[base.PairTask]]:
        del split
        expected = self.expected_layout(self.options)
        images = {_stem(p): p for p in layout.glob_files(self.manual_dir, expected[0])}
        labels = {_stem(p): p for p in layout.glob_files(self.manual_dir, expected[1])}
        pairs = layout.pair_by_key(self.manual_dir, expected, images, labels, "synthia")
        label_map = base.LABEL_MAPS["synthia"]
        return base.process_pair, [
            base.PairTask(key, image, label, label_map) for key, image, label in pairs
        ]


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
