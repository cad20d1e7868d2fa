"""A user dataset: image and label files given by glob patterns, plus an id map."""

from __future__ import annotations

import os
import re
from typing import Any

from wsda_jax.data.builders import base


class FolderPairs(base.WsdaBuilder, skip_registration=True):
    """Image/label pairs from two glob patterns (relative to manual_dir); split 'train'.

    Options: `name` (the config name: prepared data lives in folder_pairs/NAME),
    `image_glob`, `label_glob` (`**` allowed), `id_map` ('cityscapes', 'synthia',
    'identity' or a {source id: train id} dict), `size_mismatch` ('error',
    'resize', 'skip'), `weak_labels` (add coarse/point/presence like a target,
    coarse synthesised from fine) and `points_per_class`.

    Files pair up by the part of their file name that the patterns' `*` match:
    'img/*_leftImg8bit.png' and 'gt/*_labelIds.png' pair 'a_leftImg8bit.png'
    with 'a_labelIds.png'.
    """

    name = "folder_pairs"

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "name": "default",
            "image_glob": "images/*.png",
            "label_glob": "labels/*.png",
            "id_map": "identity",
            "size_mismatch": "error",
            "weak_labels": False,
            "points_per_class": 1,
        }

    @classmethod
    def config_name(cls, options: dict[str, Any]) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", options["name"]):
            raise ValueError(f"folder_pairs name {options['name']!r}: use letters, digits, _ and -")
        return options["name"]

    @classmethod
    def expected_layout(cls, options: dict[str, Any]) -> list[str]:
        return [options["image_glob"], options["label_glob"]]

    def is_target(self) -> bool:
        return bool(self.options["weak_labels"])

    def _tasks(self, split: str) -> tuple[Any, list[base.PairTask]]:
        del split
        expected = self.expected_layout(self.options)
        images = _by_key(self.manual_dir, self.options["image_glob"])
        labels = _by_key(self.manual_dir, self.options["label_glob"])
        pairs = base.pair_by_key(self.manual_dir, expected, images, labels, "folder_pairs")
        id_map = self.options["id_map"]
        if isinstance(id_map, dict):
            id_map = {int(k): int(v) for k, v in id_map.items()}
        label_map = base.label_map_from_spec(id_map)
        weak = None
        if self.options["weak_labels"]:
            weak = base.WeakSpec(points_per_class=self.options["points_per_class"])
        tasks = [
            base.PairTask(
                key, image, label, label_map, size_mismatch=self.options["size_mismatch"], weak=weak
            )
            for key, image, label in pairs
        ]
        return base.process_pair, tasks


def _by_key(manual_dir: str, pattern: str) -> dict[str, str]:
    """{key: path}: the key is the file name without the literal text around `*`."""
    basename = os.path.basename(pattern)
    prefix = basename.split("*")[0]
    suffix = basename.split("*")[-1] if "*" in basename else ""
    found: dict[str, str] = {}
    for path in base.glob_files(manual_dir, pattern):
        name = os.path.basename(path)
        key = name[len(prefix) : len(name) - len(suffix)]
        if key in found:
            raise ValueError(f"folder_pairs: {found[key]} and {path} have the same key {key!r}")
        found[key] = path
    return found
