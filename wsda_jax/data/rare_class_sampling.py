r"""Rare class sampling (DAFormer, Hoyer et al., CVPR 2022): an option beyond the reference.

Instead of a shuffled pass over the source, each source example is drawn in two steps:
a class c with probability

    P(c) = softmax_c((1 - f_c) / T),   f_c = n_c / sum_k n_k,

over the classes present in the source (n_c = source pixels of class c, T =
`config.data.rare_class_sampling.temperature`, DAFormer's 0.01), then uniformly one of
the source images holding more than `min_pixels` pixels of c. Rare classes are then
seen far more often. The per-image class pixel counts are computed once from the
prepared source labels and kept beside the prepared dataset (`STATS_FILE`, JSON).
The random scale and crop of a drawn image is then re-drawn up to CROP_RETRIES times
until the crop holds more than `min_crop_pixels` pixels of c (`RareClassCrop`,
DAFormer's `UDADataset.get_rare_class_sample`, whose bound `min_pixels * min_crop_ratio`
= 3000 * 0.5 it counts in crops of its training resolution, the prepared one here).

The draws are grain `RandomMap`s on an infinite index dataset: example k is a pure
function of the pipeline seed and k, so a run resumes exactly from its batch index.

`python -m wsda_jax.tools.class_frequencies --config=...` prints `frequency_table`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from wsda_jax import classes
from wsda_jax.data import records as records_lib
from wsda_jax.data import transforms

STATS_FILE = "source_class_pixels.json"
# DAFormer re-draws the crop at most 10 times: the 11th crop is kept whatever it holds.
CROP_RETRIES = 10


def class_pixel_counts(records: Sequence[Any], num_classes: int) -> np.ndarray:
    """int64 [N, num_classes]: pixels of each class in each record's 'label' (255 and ids
    >= num_classes are not counted)."""
    counts = np.zeros((len(records), num_classes), np.int64)
    for index in range(len(records)):
        label = records_lib.decode_example({"label": records[index]["label"]})["label"]
        ids = label[label < num_classes].astype(np.int64)
        counts[index] = np.bincount(ids, minlength=num_classes)[:num_classes]
    return counts


def _read_stats(path: str, num_records: int, num_classes: int) -> np.ndarray:
    """The counts stored at `path`; a one-line ValueError if they are unreadable or do not
    fit the dataset."""
    try:
        with open(path) as f:
            stats = json.load(f)
        pixels = np.asarray(stats["pixels"], np.int64)
    except OSError as error:  # Not the file's fault: a permission, a folder of that name.
        raise ValueError(
            f"cannot read rare class sampling statistics {path}: {error.strerror}"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"rare class sampling statistics {path} are corrupt ({type(error).__name__}); "
            "delete the file to recompute them"
        ) from None
    if pixels.shape != (num_records, num_classes) or (pixels < 0).any():
        raise ValueError(
            f"rare class sampling statistics {path} hold shape {pixels.shape}, expected "
            f"({num_records}, {num_classes}) non-negative counts; delete the file to recompute"
        )
    return pixels


def load_or_compute(directory: str, records: Sequence[Any], num_classes: int) -> np.ndarray:
    """int64 [N, C] per-image class pixel counts of `records`, from `directory/STATS_FILE`,
    computed and written there (atomically, so concurrent hosts agree) when absent."""
    path = os.path.join(directory, STATS_FILE)
    if os.path.exists(path):
        return _read_stats(path, len(records), num_classes)
    pixels = class_pixel_counts(records, num_classes)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=STATS_FILE, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump({"num_classes": num_classes, "pixels": pixels.tolist()}, f)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from others of data_dir.
        os.replace(temporary, path)
    except BaseException:  # A full disk, an interruption: no half-written file is left.
        os.remove(temporary)
        raise
    return pixels


def class_probabilities(pixels: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(class ids int64 [K], float64 [K] probabilities) over the K classes present in
    `pixels` [N, C]: softmax((1 - f) / temperature) of their pixel frequencies f."""
    totals = pixels.sum(axis=0).astype(np.float64)
    class_ids = np.flatnonzero(totals > 0)
    if class_ids.size == 0:
        raise ValueError("rare class sampling: the source labels hold no class pixels")
    frequency = totals[class_ids] / totals[class_ids].sum()
    logits = (1.0 - frequency) / temperature
    weights = np.exp(logits - logits.max())
    return class_ids, weights / weights.sum()


def images_per_class(
    pixels: np.ndarray, class_ids: np.ndarray, min_pixels: int
) -> list[np.ndarray]:
    """For each class id, the int64 indices of the images with more than `min_pixels` of it
    (DAFormer's strict >); a one-line ValueError if a class has none."""
    candidates = []
    for class_id in class_ids:
        images = np.flatnonzero(pixels[:, class_id] > min_pixels)
        if images.size == 0:
            raise ValueError(
                f"rare class sampling: no source image has more than {min_pixels} pixels of "
                f"class {class_id} ({classes.CLASS_NAMES[class_id]}); lower "
                "config.data.rare_class_sampling.min_pixels"
            )
        candidates.append(images)
    return candidates


def image_probabilities(
    num_images: int, class_probs: np.ndarray, candidates: Sequence[np.ndarray]
) -> np.ndarray:
    """float64 [num_images]: the probability that one draw picks each image,
    sum_c P(c) [i qualifies for c] / (images that qualify for c)."""
    probs = np.zeros(num_images, np.float64)
    for class_prob, images in zip(class_probs, candidates, strict=True):
        probs[images] += class_prob / images.size
    return probs


class RareClassPick(grain.transforms.RandomMap):
    """Any element -> (`records[i]`, c) for a class id c and an image i drawn as the module
    docstring says.

    `records` is any random-access sequence (a data source; a range in tests, so the
    result holds the image index).
    """

    def __init__(
        self,
        records: Sequence[Any],
        class_ids: np.ndarray,
        class_probs: np.ndarray,
        candidates: Sequence[np.ndarray],
    ):
        self.records = records
        self.class_ids = np.asarray(class_ids, np.int64)
        self.class_probs = np.asarray(class_probs, np.float64)
        self.candidates = [np.asarray(images, np.int64) for images in candidates]

    def random_map(self, element: Any, rng: np.random.Generator) -> Any:
        del element
        choice = rng.choice(len(self.class_probs), p=self.class_probs)
        images = self.candidates[choice]
        record = self.records[int(images[rng.integers(images.size)])]
        return record, int(self.class_ids[choice])


def rare_class_dataset(
    records: Sequence[Any], pixels: np.ndarray, config_rcs: Any, seed: int
) -> grain.MapDataset:
    """The infinite MapDataset of (source record, drawn class id) pairs drawn by rare class
    sampling; element k depends only on `seed` and k."""
    class_ids, class_probs = class_probabilities(pixels, config_rcs.temperature)
    candidates = images_per_class(pixels, class_ids, config_rcs.min_pixels)
    pick = RareClassPick(records, class_ids, class_probs, candidates)
    return grain.MapDataset.range(1).repeat().seed(seed).random_map(pick)


class RareClassCrop(grain.transforms.RandomMap):
    """(example, class id c) -> the example's random scale and crop, re-drawn up to
    CROP_RETRIES times while the crop's 'label' holds `min_crop_pixels` or fewer pixels
    of c (DAFormer's `n_class > min_pixels * min_crop_ratio`); the last draw is kept when
    none qualifies. With `min_crop_pixels` 0 the first crop is kept (DAFormer's
    min_crop_ratio 0)."""

    def __init__(
        self,
        scale_range: tuple[float, float],
        crop_size: tuple[int, int],
        min_crop_pixels: int,
    ):
        self.crop = transforms.RandomScaleCrop(scale_range, crop_size)
        self.min_crop_pixels = min_crop_pixels

    def random_map(self, element: tuple[Any, int], rng: np.random.Generator) -> Any:
        example, class_id = element
        crop = self.crop.draw(example, rng)
        if self.min_crop_pixels <= 0:
            return crop
        for _ in range(CROP_RETRIES):
            if np.count_nonzero(crop["label"] == class_id) > self.min_crop_pixels:
                break
            crop = self.crop.draw(example, rng)
        return crop


def frequency_table(pixels: np.ndarray, config_rcs: Any) -> str:
    """Markdown: the source's classes, rarest first, with their pixel frequency (%), the
    images with more than min_pixels of them and their sampling probability (%)."""
    class_ids, class_probs = class_probabilities(pixels, config_rcs.temperature)
    totals = pixels.sum(axis=0)[class_ids].astype(np.float64)
    lines = [
        f"| class | pixel frequency (%) | images with > {config_rcs.min_pixels} px | "
        f"sampling probability at T={config_rcs.temperature} (%) |",
        "| --- | --- | --- | --- |",
    ]
    for position in np.argsort(totals, kind="stable"):
        class_id = class_ids[position]
        qualifying = int((pixels[:, class_id] > config_rcs.min_pixels).sum())
        lines.append(
            f"| {classes.CLASS_NAMES[class_id]} | {100 * totals[position] / totals.sum():.3f} | "
            f"{qualifying} | {100 * class_probs[position]:.2f} |"
        )
    return "\n".join(lines) + "\n"
