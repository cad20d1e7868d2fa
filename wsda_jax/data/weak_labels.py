"""Weak labels derived from a dense train-id label (docs/method.md §1).

All functions take a uint8 (H, W) label of train ids with 255 = ignore and are
deterministic: point labels draw from a per-image seed made from a stable hash
of the image name (never Python's salted `hash()`), so two preparations of a
dataset give identical records. scipy (a dependency of jax) provides the
binary morphology and connected components; it is imported where it is used, since
training processes, which import this module through the data package, never call
these functions (0.3 s less at start-up).
"""

from __future__ import annotations

import hashlib

import numpy as np

from wsda_jax import classes

_SQUARE = np.ones((3, 3), bool)  # 8-neighbourhood: erosion by r pixels = Chebyshev distance r.


def stable_seed(name_or_index: str | int) -> int:
    """A 63-bit integer from the image's name (or index), identical in every process."""
    digest = hashlib.sha256(str(name_or_index).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _interior(label: np.ndarray, pixels: int, border_is_boundary: bool) -> np.ndarray:
    """bool (H, W): pixels whose (2*pixels+1)^2 window holds only their own class.

    This is a per-class binary erosion by `pixels` steps of the 8-neighbourhood,
    done for all classes at once with separable min/max filters.
    """
    import scipy.ndimage

    if pixels <= 0:
        return np.ones(label.shape, bool)
    size = 2 * pixels + 1
    # 254 is never a train id, so padding with it marks the border as a boundary.
    mode, cval = ("constant", 254) if border_is_boundary else ("nearest", 0)
    low = scipy.ndimage.minimum_filter(label, size=size, mode=mode, cval=cval)
    high = scipy.ndimage.maximum_filter(label, size=size, mode=mode, cval=cval)
    return low == high


def point_labels(
    label: np.ndarray,
    *,
    points_per_class: int,
    seed: int,
    name_or_index: str | int,
    margin: int = 0,
) -> np.ndarray:
    """Point annotation: `points_per_class` labelled pixels per present class, the rest 255.

    Args:
      label: uint8 (H, W) train ids, 255 = ignore.
      points_per_class: k; a class with fewer than k pixels gets all of its pixels.
      seed: dataset-level seed, combined with a stable hash of `name_or_index`.
      name_or_index: identifies the image, so its points do not depend on the order
        or the process in which images are prepared.
      margin: points lie at least this many pixels (8-neighbourhood steps) inside
        their class region, so they avoid ambiguous boundary pixels. The image
        border does not count as a boundary. A class with no pixel that far inside
        falls back to any of its pixels.

    Returns:
      uint8 (H, W): the class id at the chosen pixels, 255 elsewhere.
    """
    label = np.asarray(label, np.uint8)
    rng = np.random.default_rng([seed, stable_seed(name_or_index)])
    points = np.full(label.shape, classes.IGNORE_LABEL, np.uint8)
    interior = _interior(label, margin, border_is_boundary=False)
    for c in np.unique(label):
        if c == classes.IGNORE_LABEL:
            continue
        mask = label == c
        candidates = np.flatnonzero(mask & interior)
        if candidates.size == 0:
            candidates = np.flatnonzero(mask)
        chosen = rng.choice(candidates, size=min(points_per_class, candidates.size), replace=False)
        points.flat[chosen] = c
    return points


def coarse_from_fine(
    label: np.ndarray, *, erosion: int, min_region: int, every_class: bool = False
) -> np.ndarray:
    """Synthesised coarse label, in the spirit of Cityscapes' gtCoarse polygons.

    Each class region is eroded by `erosion` pixels (so boundaries become
    unlabelled) and the remaining connected regions (8-connected) smaller than
    `min_region` pixels are dropped. Every kept pixel equals the fine label; the
    rest is 255. Image borders count as boundaries, like an annotator's polygon
    that stays inside the image.

    Args:
      label: uint8 (H, W) train ids, 255 = ignore.
      erosion: pixels removed along every class boundary.
      min_region: smallest kept region, in pixels after erosion.
      every_class: a class that would lose all its regions (thin or small objects:
        poles, signs, distant people) keeps its largest region uneroded, as an
        annotator traces every object class visible in the image; the coarse label
        then marks every class of the fine label, like the point labels do.

    Returns:
      uint8 (H, W) coarse label.
    """
    import scipy.ndimage

    label = np.asarray(label, np.uint8)
    coarse = np.full(label.shape, classes.IGNORE_LABEL, np.uint8)
    interior = _interior(label, erosion, border_is_boundary=True)
    for c in np.unique(label):
        if c == classes.IGNORE_LABEL:
            continue
        regions, _ = scipy.ndimage.label((label == c) & interior, structure=_SQUARE)
        keep = np.bincount(regions.ravel()) >= min_region
        keep[0] = False  # Background of the component labelling.
        if keep.any():
            coarse[keep[regions]] = c
        elif every_class:
            regions, _ = scipy.ndimage.label(label == c, structure=_SQUARE)
            sizes = np.bincount(regions.ravel())
            sizes[0] = 0
            coarse[regions == np.argmax(sizes)] = c
    return coarse


def coarse_parameters(height: int, width: int) -> tuple[int, int]:
    """(erosion, min_region) that scale with the image: 16 px and ~1000 px at 1024x2048."""
    erosion = max(1, round(min(height, width) / 64))
    min_region = max(4, (height * width) // 2000)
    return erosion, min_region
