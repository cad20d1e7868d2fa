"""Random-access sources of prepared records, for the grain pipeline.

`open_split` returns a TFDS ArrayRecord data source: a `Sequence` whose items
are raw record dicts (PNG bytes, presence, name bytes) that
`records.decode_example` turns into numpy arrays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from wsda_jax.data import builders


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset was never prepared; the message gives the command to prepare it."""


def prepare_command(dataset: str, config_data: Any) -> str:
    """The exact `python -m wsda_jax.data.prepare ...` command for `dataset`."""
    builder_options = builders.options_for(dataset, config_data)
    manual_dir = (
        builders.manual_dir_for(dataset, config_data) or f"/path/to/raw/{dataset.split('/')[0]}"
    )
    command = [
        "python -m wsda_jax.data.prepare",
        f"--dataset={dataset}",
        f"--manual_dir={manual_dir}",
        f"--data_dir={config_data.data_dir}",
    ]
    if "points_per_class" in builder_options:
        command.append(f"--points_per_class={builder_options['points_per_class']}")
    if "train_size" in builder_options and not config_data.pre_resize:
        command.append("--nopre_resize")
    if config_data.image_format != "npy":
        command.append(f"--image_format={config_data.image_format}")
    if dataset.startswith("folder_pairs"):
        command += [
            "--image_glob='images/*.png'",
            "--label_glob='labels/*.png'",
            "--id_map=identity",
        ]
    return " ".join(command)


def ensure_prepared(dataset: str, config_data: Any) -> str:
    """Returns the prepared dataset's folder; prepares the procedural datasets on first use.

    Raises DatasetNotPreparedError (with the prepare command) for any other dataset
    that was never prepared.
    """
    builder = builders.make_builder(dataset, config_data)
    if not builder.is_prepared():
        if dataset not in builders.PROCEDURAL:
            raise DatasetNotPreparedError(
                f"dataset {dataset!r} is not prepared (looked for {builder.data_path}). "
                "Prepare it with:\n  " + prepare_command(dataset, config_data)
            )
        builders.prepare(builder)
    return os.fspath(builder.data_path)


def open_split(dataset: str, split: str, config_data: Any) -> Sequence[dict[str, Any]]:
    """A random-access source of `split` of `dataset` (len and getitem -> raw record dict).

    Args:
      dataset: a dataset name as in `wsda_jax.data.builders` (e.g. 'gta5',
        'cityscapes_weak', 'synthetic_target', 'folder_pairs/NAME').
      split: 'train' or 'val' (whichever the dataset has).
      config_data: config.data (data_dir, manual_dir, points_per_class, synthetic.*).
    """
    path = ensure_prepared(dataset, config_data)
    # Reading through the directory (not the builder class) uses the features
    # stored with the data, which is right even for user-configured folder_pairs.
    reader = tfds.builder_from_directory(path)
    if split not in reader.info.splits:
        raise ValueError(
            f"dataset {dataset!r} has splits {sorted(reader.info.splits)}, not {split!r}"
        )
    return reader.as_data_source(split)
