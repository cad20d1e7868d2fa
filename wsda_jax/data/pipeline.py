"""The grain training pipeline: the two-domain stream (the eval stream: `eval_pipeline`).

Training, per domain (source, target):

    MapDataset.source(records)[process_index::process_count]   # disjoint host shards
      .seed(s).shuffle().repeat()                              # reshuffled every epoch
      .map(decode + pick labels).random_map(scale/crop, flip)

then the two infinite streams are zipped into {'source': ..., 'target': ...},
batched with drop_remainder (still a MapDataset: batch k is the same examples for
any worker count), converted to an IterDataset from the current batch on and
prefetched in `num_workers` processes (`TrainBatches`). Its state is the batch
index, so `iterator.get_state()` / `set_state()` (and
`grain.checkpoint.CheckpointSave/CheckpointRestore` in an Orbax checkpoint)
replay exactly, also with another worker count. The colour jitter of docs/method.md
§12 runs in the train step (`augment.color_jitter`), where it costs the host
nothing.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from wsda_jax.classes import IGNORE_LABEL
from wsda_jax.data import rare_class_sampling, transforms
from wsda_jax.data import records as records_lib
from wsda_jax.data.builders import base

# Threads that decode and augment inside each process (Pillow releases the GIL
# while decoding and resizing).
READ_THREADS = 4
# Training batches each process reads ahead (a thread assembles a whole batch).
READ_BATCHES = 4
# Automatic worker count (config.data.num_workers = -1): one core keeps ~130 images/s
# flowing from 'npy' records (docs/benchmarks.md, "Input pipeline"), and a GPU at the
# reference size takes ~170/s, so 3 workers per device leave headroom; 2 cores stay with
# the training process (JAX dispatch, host-to-device copies, checkpoints).
WORKERS_PER_DEVICE = 3
RESERVED_CORES = 2
# The record key of the weak label map that travels with the target crop. 'image' uses
# gtCoarse too: the step computes the presence vector from its crop (docs/method.md §4).
WEAK_LABEL_KEYS = {
    "coarse": "coarse_label",
    "point": "point_label",
    "image": "coarse_label",
    "none": None,
}


def weak_label_key(weak_label: str, presence: str) -> str | None:
    """The record key of the target's weak label map for `config.weak_label` / `presence`.

    None when the step needs no map: plain UDA, or image labels with whole-image presence.
    """
    if weak_label not in WEAK_LABEL_KEYS:
        raise ValueError(f"weak_label={weak_label!r}: expected one of {tuple(WEAK_LABEL_KEYS)}")
    if weak_label == "image" and presence == "image":
        return None
    return WEAK_LABEL_KEYS[weak_label]


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed from integers (config seed, domain, host), independent per tuple."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class _DecodeSource(grain.transforms.Map):
    """Record -> {'image' uint8 (H,W,3), 'label' uint8 (H,W)}; decodes only what it needs."""

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        example = records_lib.decode_example({k: record[k] for k in ("image", "label")})
        return {"image": example["image"], "label": example["label"]}


class _DecodeTarget(grain.transforms.Map):
    """Record -> {'image', 'weak_label', 'label', 'presence' float32 (C,)}.

    'weak_label' is the record's map named by `weak_label_key` (gtCoarse for 'coarse'
    and 'image', points for 'point') and all 255 when there is none; 'presence' is the
    record's whole-image presence (the step uses it only with config.presence='image');
    'label' (fine, used by the oracle stage) is all 255 when the record has none.
    """

    def __init__(self, weak_label: str, num_classes: int, presence: str = "crop"):
        self.weak_key = weak_label_key(weak_label, presence)
        self.needs_presence = weak_label != "none"
        self.num_classes = num_classes

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        keys = ["image", *(k for k in ("label", self.weak_key) if k and k in record)]
        if self.weak_key and self.weak_key not in record:
            raise KeyError(f"target record lacks {self.weak_key!r}; it has {sorted(record)}")
        example = records_lib.decode_example({k: record[k] for k in keys})
        ignore = np.full(example["image"].shape[:2], IGNORE_LABEL, np.uint8)
        if "presence" in record:
            presence = np.asarray(record["presence"], np.float32)
        elif self.needs_presence:
            raise KeyError(f"target record lacks 'presence'; it has {sorted(record)}")
        else:
            presence = np.zeros((self.num_classes,), np.float32)
        return {
            "image": example["image"],
            "weak_label": example[self.weak_key] if self.weak_key else ignore,
            "presence": presence,
            "label": example.get("label", ignore),
        }


class _DecodePicked(grain.transforms.Map):
    """(record, class id) from rare class sampling -> (decoded example, class id)."""

    def __init__(self, decode: grain.transforms.Map):
        self.decode = decode

    def map(self, element: tuple[Any, int]) -> tuple[dict[str, np.ndarray], int]:
        record, class_id = element
        return self.decode.map(record), class_id


def _labels_to_uint8(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Label maps travel as uint8 (train ids < 255, 255 = ignore): a quarter of int32's
    bytes through batching, worker shared memory and the host-to-device copy; the
    steps cast them to int32 on the device."""
    out = dict(example)
    for key in transforms.label_keys(example):
        out[key] = example[key].astype(np.uint8, copy=False)
    return out


def _source_only(example: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    return {"source": example}


def _pair_to_dict(pair: tuple) -> dict[str, dict[str, np.ndarray]]:
    return {"source": pair[0], "target": pair[1]}


def _domain_dataset(
    config: ml_collections.ConfigDict,
    records: Sequence[Any],
    decode: grain.transforms.Map,
    seed: int,
    process_index: int,
    process_count: int,
    class_pixels: np.ndarray | None = None,
) -> grain.MapDataset:
    """One domain's infinite, shuffled, augmented MapDataset of examples (this host's shard).

    With `class_pixels` (int64 [N, C] per-record class pixel counts) the records are
    drawn by rare class sampling instead, each host from all records with its own seed,
    and the crop is re-drawn until it holds the drawn class (`RareClassCrop`).
    """
    if len(records) < process_count:
        raise ValueError(f"{len(records)} records cannot be sharded over {process_count} hosts")
    scale_range, crop_size = tuple(config.data.scale_range), tuple(config.data.crop_size)
    if class_pixels is not None:
        rcs = config.data.rare_class_sampling
        ds = rare_class_sampling.rare_class_dataset(records, class_pixels, rcs, seed)
        ds = ds.map(_DecodePicked(decode))
        ds = ds.random_map(
            rare_class_sampling.RareClassCrop(scale_range, crop_size, rcs.min_crop_pixels)
        )
    else:
        ds = grain.MapDataset.source(records)[process_index::process_count]
        ds = ds.seed(seed).shuffle().repeat()
        ds = ds.map(decode).random_map(transforms.RandomScaleCrop(scale_range, crop_size))
    if config.data.flip:
        ds = ds.random_map(transforms.RandomFlip())
    return ds.map(_labels_to_uint8)


def host_batch_size(per_device_batch_size: int, num_local_devices: int) -> int:
    """Images this host reads per batch: the per-device size times its devices."""
    if per_device_batch_size < 1 or num_local_devices < 1:
        raise ValueError(
            f"per-device batch {per_device_batch_size} x {num_local_devices} local devices"
        )
    return per_device_batch_size * num_local_devices


def num_workers(config_data: ml_collections.ConfigDict, num_local_devices: int) -> int:
    """grain worker processes: `config.data.num_workers`, or for -1 the host's choice:
    WORKERS_PER_DEVICE per local device, leaving RESERVED_CORES to the training
    process, and none on a host of fewer than 4 cores (there the training process
    computes on the same cores, and a worker only adds copies: docs/benchmarks.md,
    "Input pipeline")."""
    if config_data.num_workers >= 0:
        return config_data.num_workers
    cores = base.available_cores()
    if cores < 4:
        return 0
    return max(1, min(cores - RESERVED_CORES, WORKERS_PER_DEVICE * num_local_devices))


def _prefetch(
    ds: grain.IterDataset, config: ml_collections.ConfigDict, workers: int
) -> grain.IterDataset:
    if workers <= 0:
        return ds
    # grain's worker processes read absl flags; outside absl.app (tests, notebooks)
    # nobody parsed them, so accept the defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(
        num_workers=workers,
        per_worker_buffer_size=config.data.prefetch_buffer_size,
    )
    return ds.mp_prefetch(
        options, worker_init_fn=functools.partial(_exit_with_the_trainer, os.getpid())
    )


def _exit_with_the_trainer(trainer_pid: int, worker_index: int, worker_count: int) -> None:
    """grain `worker_init_fn`: the worker ends once the training process is gone. A
    trainer killed with SIGKILL (OOM killer, preemption, kill -9) cannot stop its
    workers; orphaned, they would hold memory and the trainer's stderr for ever."""
    del worker_index, worker_count

    def watch() -> None:
        while os.getppid() == trainer_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-trainer").start()


def make_train_iterator(
    config: ml_collections.ConfigDict,
    source_records: Sequence[Any],
    target_records: Sequence[Any],
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_local_devices: int = 1,
    source_class_pixels: np.ndarray | None = None,
) -> grain.DatasetIterator:
    """The infinite, checkpointable iterator of training batches for this host.

    Yields {'source': {'image' uint8 (b,H,W,3), 'label' uint8 (b,H,W)},
            'target': {'image' uint8, 'weak_label' uint8, 'presence' float32 (b,C),
                       'label' uint8}}
    ('source' only for stages other than 'adapt', which never read a target batch)
    with b = config.per_device_batch_size * num_local_devices and (H, W) =
    config.data.crop_size.
    Source records need 'image' and 'label'; target records 'image', 'presence' and
    the weak label chosen by config.weak_label ('label' is optional).
    With config.data.rare_class_sampling.enabled the source records are drawn by rare
    class sampling from `source_class_pixels` (int64 [N, C], `rare_class_sampling`).
    """
    b = host_batch_size(config.per_device_batch_size, num_local_devices)
    seeds = [_derived_seed(config.seed, domain, process_index) for domain in (0, 1)]
    if config.data.rare_class_sampling.enabled and source_class_pixels is None:
        raise ValueError("rare class sampling needs the source's class pixel counts")
    source = _domain_dataset(
        config,
        source_records,
        _DecodeSource(),
        seeds[0],
        process_index,
        process_count,
        source_class_pixels if config.data.rare_class_sampling.enabled else None,
    )
    if config.stage == "adapt":
        target_decode = _DecodeTarget(config.weak_label, config.num_classes, config.presence)
        target = _domain_dataset(
            config, target_records, target_decode, seeds[1], process_index, process_count
        )
        ds = grain.experimental.ZipMapDataset([source, target]).map(_pair_to_dict)
    else:  # Stage 1 and the oracle: no target stream to decode, augment and copy.
        ds = source.map(_source_only)
    return TrainBatches(
        ds.batch(b, drop_remainder=True), b, config, num_workers(config.data, num_local_devices)
    )


class TrainBatches:
    """The training batches from a batch index on, read by `workers` processes.

    Batching happens in the MapDataset, so batch k is the same examples whatever the
    worker count (grain's workers each read every W-th batch, interleaved back in
    order). The checkpointed state is that index and the host batch size,
    `{"batches": k, "batch_size": b}` as JSON bytes (grain.checkpoint handles such
    iterators), so a run resumes exactly on a host with another core count or
    `config.data.num_workers`; resuming rebuilds the pipeline from batch k (with
    another batch size, from the batch holding the first unread example).
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        batch_size: int,
        config: ml_collections.ConfigDict,
        workers: int,
    ):
        self._batches = batches
        self._batch_size = batch_size
        self._config = config
        self._workers = workers
        self._position = 0  # Batches handed out so far.
        self._iterator: Any = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, dict[str, np.ndarray]]:
        self.start_prefetch()
        batch = next(self._iterator)
        self._position += 1
        return batch

    def start_prefetch(self) -> None:
        """Starts reading (and the worker processes) from the current batch index."""
        if self._iterator is None:
            ds = self._batches[self._position :].to_iter_dataset(
                grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BATCHES)
            )
            self._iterator = iter(_prefetch(ds, self._config, self._workers))

    def get_state(self) -> bytes:
        return json.dumps({"batches": self._position, "batch_size": self._batch_size}).encode()

    def set_state(self, state: bytes) -> None:
        self.close()
        self._position = batches_consumed(json.loads(state), self._batch_size)

    def close(self) -> None:
        """Stops the worker processes (and frees their shared memory)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def batches_consumed(state: dict[str, Any], batch_size: int) -> int:
    """The index of the batch of `batch_size` (this host's) that holds the first example a
    saved `TrainBatches` state has not handed out (the state may come from a host with
    another local batch size)."""
    try:
        examples = int(state["batches"]) * int(state.get("batch_size", batch_size))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unknown data-iterator state {json.dumps(state)[:200]}") from None
    return examples // batch_size
