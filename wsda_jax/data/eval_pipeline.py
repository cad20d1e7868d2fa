"""The grain evaluation pipeline: every record exactly once across hosts (host p takes
records p, p+P, ...), in order, padded to the same number of batches on every host (so
jitted multi-host steps stay in lockstep); padding has mask False, label 255, index -1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from wsda_jax.classes import IGNORE_LABEL
from wsda_jax.data import records as records_lib
from wsda_jax.data import transforms
from wsda_jax.data.pipeline import READ_THREADS, host_batch_size


def _decode(records: Sequence[Any], index: int, resize: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Record `index` as {'image' uint8 [H, W, 3], 'label' int32 [H, W]}, resized to
    `resize` (height, width) if given."""
    record = records[index]
    example = records_lib.decode_example({k: record[k] for k in ("image", "label")})
    example = {"image": example["image"], "label": example["label"]}
    if resize:
        example = transforms.resize(example, *resize)
    return {"image": example["image"], "label": example["label"].astype(np.int32)}


class _EvalExample(grain.transforms.Map):
    """Host-local position k -> the k-th record of this host's shard, or masked padding."""

    def __init__(
        self,
        records: Sequence[Any],
        num_records: int,
        process_index: int,
        process_count: int,
        resize: Sequence[int],
        padding_image: np.ndarray | None,
    ):
        self.records, self.num_records = records, num_records
        self.process_index, self.process_count = process_index, process_count
        self.resize = tuple(resize)
        self.padding_image = padding_image

    def map(self, position: int) -> dict[str, np.ndarray]:
        index = self.process_index + position * self.process_count
        if index < self.num_records:
            example = _decode(self.records, index, self.resize)
            return {**example, "mask": np.asarray(True), "index": np.asarray(index, np.int32)}
        return {
            "image": self.padding_image,
            "label": np.full(self.padding_image.shape[:2], IGNORE_LABEL, np.int32),
            "mask": np.asarray(False),
            "index": np.asarray(-1, np.int32),
        }


def num_eval_batches(num_records: int, batch_size: int, process_count: int) -> int:
    """Batches per host so that every host covers its shard (the same count on all hosts)."""
    return math.ceil(math.ceil(num_records / process_count) / batch_size)


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    records: Sequence[Any],
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_local_devices: int = 1,
) -> grain.DatasetIterator:
    """Deterministic single pass over `records`, each evaluated exactly once across hosts.

    Yields {'image' uint8 (b,H,W,3), 'label' int32 (b,H,W), 'mask' bool (b,),
    'index' int32 (b,)} with b = config.eval.per_device_batch_size * num_local_devices
    (this host's share), full resolution
    or config.data.eval_resize. Only the first config.eval.max_images records are
    used when that is > 0. All hosts yield `num_eval_batches` batches; padding
    entries repeat record 0 with mask False, label all 255 and index -1.
    """
    num_records = len(records)
    if config.eval.max_images > 0:
        num_records = min(num_records, config.eval.max_images)
    b = host_batch_size(config.eval.per_device_batch_size, num_local_devices)
    total = num_eval_batches(num_records, b, process_count) * b
    resize = tuple(config.data.eval_resize)
    # Padding repeats record 0's image, decoded once here rather than once per entry
    # (a small val set in a large batch is mostly padding).
    last_index = process_index + (total - 1) * process_count
    padding_image = _decode(records, 0, resize)["image"] if last_index >= num_records else None
    ds = grain.MapDataset.range(total).map(
        _EvalExample(records, num_records, process_index, process_count, resize, padding_image)
    )
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=2 * b))
    return iter(ds.batch(b, drop_remainder=True))
