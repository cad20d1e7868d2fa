"""TFDS builders for every dataset, and how a dataset name plus config.data picks one.

Dataset names: 'gta5' (or 'gta5/skip' to drop image/label size mismatches),
'synthia', 'cityscapes_weak' (or 'cityscapes_weak/synthetic_coarse'),
'folder_pairs/NAME', 'synthetic_source', 'synthetic_target'.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tensorflow_datasets as tfds

from wsda_jax.data import incomplete
from wsda_jax.data.builders import base, cityscapes, folder_pairs, gta5, procedural, synthia

BUILDERS: dict[str, type[base.WsdaBuilder]] = {
    "gta5": gta5.Gta5,
    "synthia": synthia.Synthia,
    "cityscapes_weak": cityscapes.CityscapesWeak,
    "folder_pairs": folder_pairs.FolderPairs,
    "synthetic_source": procedural.SyntheticSource,
    "synthetic_target": procedural.SyntheticTarget,
}
PROCEDURAL = ("synthetic_source", "synthetic_target")


def split_name(dataset: str) -> tuple[str, str]:
    """'gta5/skip' -> ('gta5', 'skip'); 'synthia' -> ('synthia', '')."""
    name, _, variant = dataset.partition("/")
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {sorted(BUILDERS)}")
    return name, variant


def options_for(dataset: str, config_data: Any) -> dict[str, Any]:
    """Builder options from a dataset name and config.data (see module docstring)."""
    return {"image_format": config_data.image_format, **_dataset_options(dataset, config_data)}


def _dataset_options(dataset: str, config_data: Any) -> dict[str, Any]:
    name, variant = split_name(dataset)
    if variant and name not in ("gta5", "cityscapes_weak", "folder_pairs"):
        raise ValueError(f"dataset {name!r} has no variants, got {dataset!r}")
    if name == "gta5":
        size = list(gta5.TRAIN_SIZE) if config_data.pre_resize else None
        return {"size_mismatch": variant or "resize", "train_size": size}
    if name == "cityscapes_weak":
        if variant not in ("", "synthetic_coarse"):
            raise ValueError(f"unknown variant {dataset!r}: use cityscapes_weak/synthetic_coarse")
        coarse = "synthetic" if variant else "gt"
        size = list(cityscapes.TRAIN_SIZE) if config_data.pre_resize else None
        return {
            "points_per_class": int(config_data.points_per_class),
            "coarse": coarse,
            "train_size": size,
        }
    if name == "folder_pairs":
        return {"name": variant or "default"}
    if name == "synthia":
        return {}
    synthetic = config_data.synthetic
    options = {"height": synthetic.height, "width": synthetic.width, "seed": synthetic.seed}
    if name == "synthetic_source":
        return dict(options, num_train=synthetic.num_source, num_val=0)
    return dict(
        options,
        num_train=synthetic.num_target_train,
        num_val=synthetic.num_target_val,
        points_per_class=int(config_data.points_per_class),
        coarse=synthetic.coarse,
    )


def manual_dir_for(dataset: str, config_data: Any) -> str:
    """config.data.source_manual_dir for the source dataset when set, else manual_dir."""
    if dataset == config_data.source and config_data.source_manual_dir:
        return config_data.source_manual_dir
    return config_data.manual_dir


def _preparation_workers(config_data: Any) -> int:
    """config.data.num_workers processes, or every available core for -1 (automatic)."""
    if config_data.num_workers >= 0:
        return config_data.num_workers
    return base.available_cores()


def make_builder(
    dataset: str,
    config_data: Any,
    *,
    options: dict[str, Any] | None = None,
    manual_dir: str | None = None,
    num_workers: int | None = None,
) -> base.WsdaBuilder:
    """The builder of `dataset` under config.data.data_dir; `options` override config.data."""
    name, _ = split_name(dataset)
    return BUILDERS[name](
        data_dir=config_data.data_dir,
        options=dict(options_for(dataset, config_data), **(options or {})),
        manual_dir=manual_dir if manual_dir is not None else manual_dir_for(dataset, config_data),
        num_workers=_preparation_workers(config_data) if num_workers is None else num_workers,
        file_format="array_record",
    )


def _normalised(options: dict[str, Any]) -> Any:
    return json.loads(json.dumps(options, sort_keys=True))


def prepare(builder: base.WsdaBuilder) -> dict[str, Any]:
    """Prepares the dataset unless it is already there; returns its preparation summary.

    An existing dataset prepared with other options under the same name (possible
    only for folder_pairs, whose name is chosen by the user) is an error rather
    than silently reused.
    """
    if not builder.is_prepared():
        builder.check_manual_dir()
        download_config = tfds.download.DownloadConfig(
            manual_dir=builder.manual_dir or None, try_download_gcs=False
        )
        # One preparation of a dataset at a time; stale `incomplete.*` folders removed.
        with incomplete.preparing(builder):
            try:
                builder.download_and_prepare(download_config=download_config)
            except OSError:
                # Another process may have finished the same preparation first (the
                # rename of its `incomplete.*` folder wins); then its result is used.
                if not builder.is_prepared():
                    raise
    summary = base.read_summary(os.fspath(builder.data_path))
    if summary and _normalised(summary["options"]) != _normalised(builder.options):
        raise ValueError(
            f"{builder.data_path} was prepared with options {summary['options']}, not "
            f"{builder.options}: choose another name or delete that folder"
        )
    return summary
