"""What every dataset builder shares: features, per-example work, parallel map, summary.

Builders are TFDS `GeneratorBasedBuilder`s prepared to ArrayRecord without
TensorFlow: every feature is a raw numpy `Tensor` or `Text`, so TFDS only
serialises bytes. The per-example work (read PNGs, map ids, resize, weak labels,
encode: `records.encode_example` with the `image_format` option) is a module-level
function of a small picklable task, run in a process pool. TFDS writes into
`incomplete.*` and renames the folder only when every split is written, so an
interrupted preparation leaves nothing that looks prepared.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from google.protobuf import json_format

from wsda_jax import classes, errors, label_ops
from wsda_jax.data import records, weak_labels
from wsda_jax.data.builders import layout
from wsda_jax.data.builders.image_io import (
    PreparationError,
    pre_resize,
    read_image,
    read_label_ids,
    resize_image,
)

SUMMARY_FILE = "preparation_summary.json"
SIZE_COUNT = "size_"  # A summary's count of examples of one size: 'size_1024x2048'.


def source_features() -> tfds.features.FeaturesDict:
    """image, label: PNG bytes; name: str (ARCHITECTURE.md record format)."""
    png = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.features.FeaturesDict({"image": png, "label": png, "name": tfds.features.Text()})


def target_features(num_classes: int = classes.NUM_CLASSES) -> tfds.features.FeaturesDict:
    """Source features plus coarse_label, point_label (PNG bytes) and presence uint8 (C,)."""
    png = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.features.FeaturesDict(
        {
            "image": png,
            "label": png,
            "coarse_label": png,
            "point_label": png,
            "presence": tfds.features.Tensor(shape=(num_classes,), dtype=np.uint8),
            "name": tfds.features.Text(),
        }
    )


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Source id -> train id: `lookup` uint8 (N,), `known` bool (N,) ids the source defines."""

    lookup: np.ndarray
    known: np.ndarray


LABEL_MAPS = {
    "cityscapes": LabelMap(classes.CITYSCAPES_ID_TO_TRAIN, classes.CITYSCAPES_KNOWN_IDS),
    "synthia": LabelMap(classes.SYNTHIA_ID_TO_TRAIN, classes.SYNTHIA_KNOWN_IDS),
    "identity": LabelMap(classes.IDENTITY_TO_TRAIN, classes.IDENTITY_KNOWN_IDS),
}


def label_map_from_spec(spec: str | dict[int, int]) -> LabelMap:
    """'cityscapes' | 'synthia' | 'identity' | {source id: train id} (other ids are out of map)."""
    if isinstance(spec, str):
        if spec not in LABEL_MAPS:
            raise ValueError(
                f"unknown id map {spec!r}: expected one of {sorted(LABEL_MAPS)} or a dict"
            )
        return LABEL_MAPS[spec]
    pairs = [_id_pair(key, value) for key, value in spec.items()]
    size = max(256, max((source_id for source_id, _ in pairs), default=0) + 1)
    lookup = np.full((size,), classes.IGNORE_LABEL, np.uint8)
    known = np.zeros((size,), bool)
    for source_id, train_id in pairs:
        lookup[source_id] = train_id
        known[source_id] = True
    return LabelMap(lookup, known)


def _id_pair(key: object, value: object) -> tuple[int, int]:
    """(source id, train id) of one id map entry; a one-line ValueError unless the source
    id is a label image's value (0-65535: 8- or 16-bit) and the train id one of the
    classes' or the ignore label."""

    def integer(x: object) -> int | None:
        if isinstance(x, int) and not isinstance(x, bool):
            return x
        return int(x) if isinstance(x, str) and x.strip().isdigit() else None

    source_id, train_id = integer(key), integer(value)
    valid_train_ids = (*range(classes.NUM_CLASSES), classes.IGNORE_LABEL)
    if source_id is None or not 0 <= source_id <= 65535 or train_id not in valid_train_ids:
        raise ValueError(
            f"id map entry {key!r}: {value!r}: source ids are integers 0-65535, train ids "
            f"0-{classes.NUM_CLASSES - 1} or {classes.IGNORE_LABEL} (ignored)"
        )
    return source_id, train_id


@dataclasses.dataclass(frozen=True)
class WeakSpec:
    """How a target's weak labels are made: k points per class (seeded by image name),
    coarse from a gtCoarse-style file when the task has one, else synthesised from fine."""

    points_per_class: int
    point_margin: int = 0
    seed: int = 0
    coarse_every_class: bool = False  # `weak_labels.coarse_from_fine(every_class=...)`.


@dataclasses.dataclass(frozen=True)
class PairTask:
    """One example from files on disk: image, id label, optional coarse id label."""

    name: str
    image_path: str
    label_path: str
    label_map: LabelMap
    size_mismatch: str = "error"  # 'resize' (image to label size), 'skip' or 'error'.
    coarse_path: str | None = None
    weak: WeakSpec | None = None
    # (height, width) of the fixed pre-resize (docs/method.md §12), or None.
    resize_to: tuple[int, int] | None = None


def size_option(size: Sequence[int] | None) -> tuple[int, int] | None:
    """A builder's [height, width] option as a tuple (None = no pre-resize); checked."""
    if size is None:
        return None
    if len(size) != 2 or any(int(side) < 8 for side in size):
        raise ValueError(f"size {list(size)}: expected [height, width], both >= 8")
    return int(size[0]), int(size[1])


def size_suffix(size: Sequence[int] | None, prefix: str) -> str:
    """The part of a dataset name that records its pre-resize: '' or e.g. '_1280x720'."""
    size = size_option(size)
    return "" if size is None else f"{prefix}{size[1]}x{size[0]}"


def finish_example(
    name: str,
    image: np.ndarray,
    label: np.ndarray,
    coarse: np.ndarray | None,
    weak: WeakSpec | None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Adds weak labels for targets. Returns (example of numpy arrays, counts)."""
    example = {"image": image, "label": label, "name": name}
    counts = {"images": 1}
    if weak is not None:
        if coarse is None:
            erosion, min_region = weak_labels.coarse_parameters(*label.shape)
            coarse = weak_labels.coarse_from_fine(
                label, erosion=erosion, min_region=min_region, every_class=weak.coarse_every_class
            )
            counts["coarse_synthesised"] = 1
        example["coarse_label"] = coarse
        example["point_label"] = weak_labels.point_labels(
            label,
            points_per_class=weak.points_per_class,
            seed=weak.seed,
            name_or_index=name,
            margin=weak.point_margin,
        )
        presence = label_ops.presence(label[None], classes.NUM_CLASSES)[0]
        example["presence"] = presence.astype(np.uint8)
    return example, counts


def encoded(
    fn: Callable[[Any], tuple[str, dict[str, Any] | None, dict[str, int]]],
    image_format: str,
    task: Any,
) -> tuple[str, dict[str, Any] | None, dict[str, int]]:
    """fn(task) = (key, example or None, counts) with the example encoded as a record."""
    key, example, counts = fn(task)
    return key, None if example is None else records.encode_example(example, image_format), counts


def process_pair(task: PairTask) -> tuple[str, dict[str, Any] | None, dict[str, int]]:
    """Reads, maps and checks one file pair. Returns (key, example or None, counts)."""
    image = read_image(task.image_path)
    label, out_of_map = classes.map_labels(
        read_label_ids(task.label_path), task.label_map.lookup, task.label_map.known
    )
    counts = collections.Counter(out_of_map_pixels=out_of_map)
    if image.shape[:2] != label.shape:
        message = (
            f"image {task.image_path} is {image.shape[1]}x{image.shape[0]} but its label "
            f"{task.label_path} is {label.shape[1]}x{label.shape[0]}"
        )
        if task.size_mismatch == "skip":
            return task.name, None, dict(counts, skipped=1)
        if task.size_mismatch != "resize":
            raise PreparationError(message)
        image = resize_image(image, *label.shape)
        counts["resized"] += 1
    coarse = None
    if task.coarse_path is not None:
        coarse, coarse_out = classes.map_labels(
            read_label_ids(task.coarse_path), task.label_map.lookup, task.label_map.known
        )
        counts["out_of_map_pixels"] += coarse_out
        if coarse.shape != label.shape:
            raise PreparationError(
                f"coarse label {task.coarse_path} does not match {task.label_path}"
            )
    if task.resize_to is not None and image.shape[:2] != tuple(task.resize_to):
        maps = {"label": label} if coarse is None else {"label": label, "coarse": coarse}
        image, maps = pre_resize(image, maps, task.resize_to)
        label, coarse = maps["label"], maps.get("coarse")
        counts["pre_resized"] += 1
    counts[f"{SIZE_COUNT}{image.shape[0]}x{image.shape[1]}"] += 1
    # Weak labels come after the pre-resize: points are drawn at the working size.
    example, finish_counts = finish_example(task.name, image, label, coarse, task.weak)
    counts.update(finish_counts)
    return task.name, example, dict(counts)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or Slurm's
    share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parallel_map(
    fn: Callable[[Any], Any], tasks: Sequence[Any], *, num_workers: int, desc: str
) -> Iterator[Any]:
    """Yields fn(task) in task order, with a progress bar.

    num_workers > 1 uses a 'forkserver' process pool: workers fork from a fresh
    server process that imported this module once (cheap to start, and safe when
    the caller already runs JAX threads, unlike plain fork); fn and tasks must be
    picklable. A worker that dies (killed, out of memory) stops the map with one-line
    PreparationError, not a hang; Ctrl-C reaches the caller only.
    """
    progress = tqdm.tqdm(
        total=len(tasks), desc=desc, unit="img", leave=False, disable=not sys.stderr.isatty()
    )
    try:
        if num_workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield fn(task)
                progress.update()
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        chunksize = max(1, min(16, len(tasks) // (4 * num_workers)))
        pool = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=context, initializer=_ignore_sigint
        )
        finished = False
        try:
            for result in pool.map(fn, tasks, chunksize=chunksize):
                yield result
                progress.update()
            finished = True
        except concurrent.futures.process.BrokenProcessPool as error:
            raise PreparationError(
                f"a {desc} worker process died (killed, or out of memory): run the same "
                "command again (with a smaller --num_workers if memory is short)"
            ) from error
        finally:
            if not finished:  # An error, Ctrl-C or SIGTERM: the queued chunks are dropped.
                _terminate_workers(pool)
            pool.shutdown(wait=finished, cancel_futures=True)
    finally:
        progress.close()


def _terminate_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Ends the pool's workers now; shutting down alone would wait (at exit) for every
    chunk already handed to them. (Python 3.14 names this `terminate_workers`.)"""
    for process in list((pool._processes or {}).values()):  # noqa: SLF001 - see above.
        process.terminate()


def _ignore_sigint() -> None:
    """A pool worker leaves Ctrl-C (sent to the whole process group) to the main process,
    which stops the map and the pool. SIGTERM keeps its default: the pool ends a worker
    with it, and a worker that ignored it would outlive the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """The DatasetInfo of a dataset prepared from local files only.

    Before a dataset is prepared, TFDS looks up precomputed info in its public bucket
    (`initialize_from_bucket`); that lookup is disabled in this TFDS, yet it leaves one
    empty `/tmp/tmp*tfds` folder per builder. None of these datasets is in the bucket,
    so the lookup is skipped.
    """

    def initialize_from_bucket(self) -> None:
        """Nothing to look up: the info comes from `_info` and, once prepared, the data dir."""


class WsdaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: options -> config name, manual_dir, worker count, preparation summary.

    Subclasses set `name`, `SPLITS`, `TARGET` and implement `config_name(options)`,
    `expected_layout(options)` and `_tasks(split) -> (fn, tasks)`. Every builder also
    takes the option `image_format` ('npy' or 'png', `records.IMAGE_FORMATS`); 'npy'
    datasets carry the suffix '_npy' in their name.
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "See wsda_jax/data/builders for the expected layout."
    SPLITS: tuple[str, ...] = ("train",)
    TARGET = False
    NEEDS_MANUAL_DIR = True
    # Nothing is downloaded, so there are no URL checksums: skip TFDS's lookup of them.
    url_infos = None

    def __init__(
        self,
        *,
        data_dir: str,
        options: dict[str, Any] | None = None,
        manual_dir: str = "",
        num_workers: int = 1,
        **kwargs: Any,
    ):
        self.options = {"image_format": "npy", **self.default_options(), **(options or {})}
        if self.options["image_format"] not in records.IMAGE_FORMATS:
            raise ValueError(
                f"image_format={self.options['image_format']!r}: "
                f"expected one of {records.IMAGE_FORMATS}"
            )
        npy_suffix = "_npy" if self.options["image_format"] == "npy" else ""
        self.manual_dir = os.path.expanduser(manual_dir) if manual_dir else ""
        self.num_workers = num_workers
        self.summary: dict[str, dict[str, int]] = {}
        config = tfds.core.BuilderConfig(
            name=self.config_name(self.options) + npy_suffix,
            description=json.dumps(self.options, sort_keys=True),
        )
        try:  # Reads dataset_info.json and features.json of a prepared dataset.
            super().__init__(data_dir=os.path.expanduser(data_dir), config=config, **kwargs)
        except (ValueError, OSError, json_format.Error) as error:
            if isinstance(error, FileNotFoundError):
                raise
            folder = os.path.join(os.path.expanduser(data_dir), self.name, config.name)
            raise errors.DamagedDatasetError(
                f"the prepared dataset in {folder} is unreadable: {_damaged_json(folder)}"
                f"{type(error).__name__}: {str(error).rstrip('.')}"
            ) from error

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def config_name(cls, options: dict[str, Any]) -> str:
        del options
        return "default"

    @classmethod
    def expected_layout(cls, options: dict[str, Any]) -> list[str]:
        del options
        return []

    def _info(self) -> tfds.core.DatasetInfo:
        features = target_features() if self.is_target() else source_features()
        return LocalDatasetInfo(builder=self, features=features, description=self.__doc__)

    def is_target(self) -> bool:
        """Targets carry coarse_label, point_label and presence."""
        return self.TARGET

    def splits(self) -> tuple[str, ...]:
        """The splits this preparation writes."""
        return self.SPLITS

    def _tasks(self, split: str) -> tuple[Callable[[Any], Any], list[Any]]:
        raise NotImplementedError(f"{type(self).__name__} must implement _tasks")

    def check_manual_dir(self) -> None:
        """Raises LayoutError when the raw dataset folder is missing or empty."""
        if not self.NEEDS_MANUAL_DIR:
            return
        expected = self.expected_layout(self.options)
        if not self.manual_dir:
            raise layout.layout_error(
                "<manual_dir>", expected, f"{self.name}: --manual_dir is required"
            )
        if not os.path.isdir(self.manual_dir) or not os.listdir(self.manual_dir):
            raise layout.layout_error(
                self.manual_dir, expected, f"{self.name}: manual_dir is missing or empty"
            )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Raw files come from self.manual_dir; nothing is downloaded.
        self.check_manual_dir()
        # Build every split's task list first, so a layout problem fails before writing.
        tasks = {split: self._tasks(split) for split in self.splits()}
        return {split: self._generate_examples(split, *tasks[split]) for split in self.splits()}

    def _generate_examples(
        self, split: str, fn: Callable[[Any], Any], tasks: list[Any]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        counts: collections.Counter[str] = collections.Counter()
        desc = f"{self.name} {split}"
        fn = functools.partial(encoded, fn, self.options["image_format"])
        for key, record, task_counts in parallel_map(
            fn, tasks, num_workers=self.num_workers, desc=desc
        ):
            counts.update(task_counts)
            if record is not None:
                yield key, record
        self.summary[split] = dict(sorted(counts.items()))
        # data_dir is the `incomplete.*` folder here, renamed with the dataset at the end.
        summary = {"options": self.options, "splits": self.summary}
        with open(os.path.join(self.data_dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)


def _damaged_json(folder: str) -> str:
    """'FILE: ' for the first JSON file under `folder` that does not parse, else ''."""
    for directory, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(directory, name), "rb") as f:
                        json.loads(f.read())
                except (OSError, ValueError):
                    return f"{os.path.join(directory, name)}: "
    return ""


def read_summary(data_path: str) -> dict[str, Any]:
    """The preparation summary saved next to a prepared dataset ({} if absent)."""
    path = os.path.join(data_path, SUMMARY_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
