"""A user dataset: image and label files given by glob patterns, plus an id map."""

from __future__ import annotations

import os
import re
from typing import Any

from wsda_jax.data.builders import base, layout


class FolderPairs(base.WsdaBuilder, skip_registration=True):
    """Image/label pairs from glob patterns (relative to manual_dir); 'train', optional 'val'.

    Options: `name` (the config name: prepared data lives in folder_pairs/NAME),
    `image_glob`, `label_glob` (`**` allowed), `val_image_glob`, `val_label_glob`
    (both or neither: a 'val' split, which a target domain needs for evaluation),
    `id_map` ('cityscapes', 'synthia', 'identity' or a {source id: train id} dict),
    `size_mismatch` ('error', 'resize', 'skip'), `weak_labels` (add
    coarse/point/presence like a target, coarse synthesised from fine) and
    `points_per_class`.

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
            "val_image_glob": "",
            "val_label_glob": "",
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
        return [pattern for split in _splits(options) for pattern in _globs(options, split)]

    def is_target(self) -> bool:
        return bool(self.options["weak_labels"])

    def splits(self) -> tuple[str, ...]:
        return _splits(self.options)

    def _tasks(self, split: str) -> tuple[Any, list[base.PairTask]]:
        image_glob, label_glob = _globs(self.options, split)
        expected = [image_glob, label_glob]
        images = _by_key(self.manual_dir, image_glob)
        labels = _by_key(self.manual_dir, label_glob)
        pairs = layout.pair_by_key(self.manual_dir, expected, images, labels, "folder_pairs")
        label_map = base.label_map_from_spec(self.options["id_map"])
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


def _splits(options: dict[str, Any]) -> tuple[str, ...]:
    """('train',) or ('train', 'val'); a val split needs both of its patterns."""
    given = [bool(options["val_image_glob"]), bool(options["val_label_glob"])]
    if any(given) and not all(given):
        raise ValueError(
            "folder_pairs: give both val_image_glob and val_label_glob, or neither "
            f"(got {options['val_image_glob']!r} and {options['val_label_glob']!r})"
        )
    return ("train", "val") if all(given) else ("train",)


def _globs(options: dict[str, Any], split: str) -> tuple[str, str]:
    """(image pattern, label pattern) of `split`."""
    prefix = "" if split == "train" else f"{split}_"
    return options[f"{prefix}image_glob"], options[f"{prefix}label_glob"]


def _by_key(manual_dir: str, pattern: str) -> dict[str, str]:
    """{key: path}: the key is the file name without the literal text around `*`."""
    basename = os.path.basename(pattern)
    prefix = basename.split("*")[0]
    suffix = basename.split("*")[-1] if "*" in basename else ""
    found: dict[str, str] = {}
    for path in layout.glob_files(manual_dir, pattern):
        name = os.path.basename(path)
        key = name[len(prefix) : len(name) - len(suffix)]
        if key in found:
            raise ValueError(f"folder_pairs: {found[key]} and {path} have the same key {key!r}")
        found[key] = path
    return found
