"""Random-access sources of prepared records, for the grain pipeline.

`open_split` returns a TFDS ArrayRecord data source: a `Sequence` whose items
are raw record dicts (PNG bytes, presence, name bytes) that
`records.decode_example` turns into numpy arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from orbax.checkpoint import multihost

from wsda_jax import errors
from wsda_jax.data import builders, rare_class_sampling


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset was never prepared; the message gives the command to prepare it."""


def prepare_command(
    dataset: str, config_data: Any, saved_options: Mapping[str, Any] | None = None
) -> str:
    """The exact `python -m wsda_jax.data.prepare ...` command for `dataset`; for a
    `folder_pairs` dataset prepared before, with the options it was prepared with
    (`saved_options`, from its preparation summary), else example globs."""
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
    if dataset.startswith("folder_pairs") and saved_options:
        for flag in ("image_glob", "label_glob", "val_image_glob", "val_label_glob"):
            if saved_options.get(flag):
                command.append(f"--{flag}={shlex.quote(saved_options[flag])}")
        id_map = saved_options.get("id_map", "identity")
        id_map = id_map if isinstance(id_map, str) else json.dumps(id_map)
        command.append(f"--id_map={shlex.quote(id_map)}")
        command.append(f"--size_mismatch={saved_options.get('size_mismatch', 'error')}")
        if saved_options.get("weak_labels"):
            command.append("--weak_labels")
    elif dataset.startswith("folder_pairs"):
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
    path = None  # Known once the dataset is found.
    try:
        path = ensure_prepared(dataset, config_data)
        # Reading through the directory (not the builder class) uses the features
        # stored with the data, which is right even for user-configured folder_pairs.
        reader = tfds.builder_from_directory(path)
    except errors.DamagedDatasetError as error:
        raise errors.DamagedDatasetError(
            f"{error}; {reprepare_hint(dataset, config_data, path)}"
        ) from error
    if split not in reader.info.splits:
        raise ValueError(
            f"dataset {dataset!r} has splits {sorted(reader.info.splits)}, not {split!r}"
        )
    return CheckedRecords(
        reader.as_data_source(split),
        os.path.join(path, f"{reader.name}-{split}.array_record-*"),
        f"{reprepare_hint(dataset, config_data, path)} ({path})",
    )


def reprepare_hint(dataset: str, config_data: Any, path: str | None) -> str:
    """How to replace the damaged prepared dataset in `path` (its version folder)."""
    if dataset in builders.PROCEDURAL:
        return "delete the dataset's folder: the next run generates it again"
    saved_options = _saved_summary(path).get("options") if path else None
    command = prepare_command(dataset, config_data, saved_options)
    return f"delete the dataset's folder and prepare it again: {command}"


def _saved_summary(path: str) -> dict[str, Any]:
    """The preparation summary in `path`, or {} when it is absent or unreadable."""
    try:
        summary = builders.base.read_summary(path)
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


class CheckedRecords(Sequence):
    """A record source whose read errors (a truncated or damaged `.array_record` file)
    are one DamagedDatasetError naming the files and how to prepare them again."""

    def __init__(self, records: Sequence[Any], files: str, hint: str):
        self.records, self.files, self.hint = records, files, hint

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: Any) -> Any:
        try:
            return self.records[index]
        except (RuntimeError, TypeError, ValueError, OSError) as error:
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            reason = f"{type(error).__name__}: {reason}"
            if errors.is_machine_fault(error):  # Not damaged: no reason to prepare again.
                raise ValueError(
                    f"record {index} of {self.files} cannot be read now ({reason}); the "
                    "files are not damaged: fix that (permissions, the disk) and run again"
                ) from error
            raise errors.DamagedDatasetError(
                f"record {index} of {self.files} is unreadable ({reason}); {self.hint}"
            ) from error


@dataclasses.dataclass(frozen=True)
class Datasets:
    """Random-access record sources of the three splits a run reads."""

    source: Sequence[Any]
    target: Sequence[Any]
    val: Sequence[Any]


# Generating the embedded datasets takes minutes on a slow host; device collectives (gloo on
# the CPU) give up after 30 s, so the processes wait at coordination-service barriers.
_PREPARATION_TIMEOUT_MS = 60 * 60 * 1000


def _procedural_first_on_process_zero(
    config: ml_collections.ConfigDict, datasets: Sequence[str]
) -> None:
    """With several processes, process 0 generates the embedded datasets while the others
    wait; they then reuse its files (a shared data_dir) or generate their own copy (a
    local one), and all start training together."""
    procedural = [dataset for dataset in datasets if dataset in builders.PROCEDURAL]
    if jax.process_count() == 1 or not procedural:
        return
    barrier = multihost.get_barrier_sync_fn()
    if jax.process_index() == 0:
        for dataset in procedural:
            ensure_prepared(dataset, config.data)
    barrier(key="wsda_jax_embedded_datasets_generated", timeout_ms=_PREPARATION_TIMEOUT_MS)
    for dataset in procedural:
        ensure_prepared(dataset, config.data)
    barrier(key="wsda_jax_embedded_datasets_ready", timeout_ms=_PREPARATION_TIMEOUT_MS)


def open_val(config: ml_collections.ConfigDict) -> Sequence[Any]:
    """The target's val split alone (evaluation of a checkpoint)."""
    _procedural_first_on_process_zero(config, [config.data.target])
    return _open_checked_val(config)


def _open_checked_val(config: ml_collections.ConfigDict) -> Sequence[Any]:
    """The target's val split; a one-line ValueError, before any training, when its
    images come in several sizes (counted when it was prepared) and config.data.eval_resize
    is not set: evaluation batches images of one size."""
    val = open_split(config.data.target, "val", config.data)
    if tuple(config.data.eval_resize):
        return val
    summary = _saved_summary(ensure_prepared(config.data.target, config.data))
    counts = summary.get("splits", {}).get("val", {})
    sizes = sorted(
        key[len(builders.base.SIZE_COUNT) :]
        for key in counts
        if key.startswith(builders.base.SIZE_COUNT)
    )
    if len(sizes) > 1:
        height, width = (int(n) for n in sizes[0].split("x"))
        raise ValueError(
            f"the val images of {config.data.target!r} have {len(sizes)} sizes "
            f"({', '.join(sizes[:4])}{', ...' if len(sizes) > 4 else ''}; height x width) "
            f"and evaluation batches images of one size: set "
            f"--config.data.eval_resize='({height},{width})' (or another size)"
        )
    return val


def open_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """Source train, target train and target val (oracle: target train as the source)."""
    used = [config.data.target] + ([] if config.stage == "oracle" else [config.data.source])
    _procedural_first_on_process_zero(config, used)
    target = open_split(config.data.target, "train", config.data)
    val = _open_checked_val(config)
    if config.stage == "oracle":
        return Datasets(source=target, target=target, val=val)
    source = open_split(config.data.source, "train", config.data)
    return Datasets(source=source, target=target, val=val)


def source_class_pixels(
    config: ml_collections.ConfigDict, source: Sequence[Any]
) -> np.ndarray | None:
    """With rare class sampling: the source's int64 [N, C] class pixel counts, kept beside
    the prepared dataset (computed on first use); else None."""
    if not config.data.rare_class_sampling.enabled:
        return None
    dataset = config.data.target if config.stage == "oracle" else config.data.source
    directory = ensure_prepared(dataset, config.data)
    return rare_class_sampling.load_or_compute(directory, source, config.num_classes)
