"""Host-side numpy transforms on example dicts, for the grain pipelines: the geometric
part of the training augmentation (scale, crop, flip) and the eval resize.

An example holds 'image' uint8 (H, W, 3), any number of label maps under keys
ending in 'label' (uint8 or int32 (H, W), 255 = ignore) and other entries
(presence, name) that the geometric transforms pass through unchanged. Every
label map moves with the image; images are resampled bilinearly, labels with
nearest neighbour so no new label values appear. Randomness comes from the
`np.random.Generator` that grain hands to a `RandomMap`, so a pipeline replays
exactly from its seed. The photometric part (colour jitter) runs in the train step
(`augment.color_jitter`).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from PIL import Image

from wsda_jax.classes import IGNORE_LABEL

Example = dict[str, Any]


def label_keys(example: Example) -> list[str]:
    """The keys of the example's label maps ('label', 'weak_label', 'coarse_label', ...)."""
    return [key for key in example if key.endswith("label")]


def _resize_box(array: np.ndarray, size: tuple[int, int], box: tuple, resample: int) -> np.ndarray:
    """Pillow resize of the source window `box` (x0, y0, x1, y1) to size (height, width)."""
    image = Image.fromarray(array)
    out = image.resize((size[1], size[0]), resample=resample, box=box)
    return np.asarray(out, dtype=array.dtype)


def resize(example: Example, height: int, width: int) -> Example:
    """Resizes the image (bilinear) and every label map (nearest) to (height, width)."""
    h, w = example["image"].shape[:2]
    box = (0, 0, w, h)
    out = dict(example)
    out["image"] = _resize_box(example["image"], (height, width), box, Image.BILINEAR)
    for key in label_keys(example):
        out[key] = _resize_box(example[key], (height, width), box, Image.NEAREST)
    return out


def scale_crop(
    example: Example, scale: float, top: int, left: int, crop_size: tuple[int, int]
) -> Example:
    """The crop at (top, left) of size crop_size of the example rescaled by `scale`.

    Equivalent to resizing the whole example to round((H, W) * scale) and then
    cropping, but only the needed window is resampled (Pillow's `box`), which keeps
    the cost proportional to the crop, not to the scaled image. Where the crop
    extends past the scaled image (bottom/right), the image is padded with 0 and
    the label maps with 255.
    """
    h, w = example["image"].shape[:2]
    scaled_h, scaled_w = max(1, round(h * scale)), max(1, round(w * scale))
    crop_h, crop_w = crop_size
    valid_h, valid_w = min(crop_h, scaled_h - top), min(crop_w, scaled_w - left)
    if valid_h <= 0 or valid_w <= 0:
        raise ValueError(f"crop at ({top}, {left}) misses the {scaled_h}x{scaled_w} image")
    sy, sx = h / scaled_h, w / scaled_w  # source pixels per scaled pixel
    box = (left * sx, top * sy, (left + valid_w) * sx, (top + valid_h) * sy)
    out = dict(example)
    image = np.zeros((crop_h, crop_w, 3), np.uint8)
    image[:valid_h, :valid_w] = _resize_box(
        example["image"], (valid_h, valid_w), box, Image.BILINEAR
    )
    out["image"] = image
    for key in label_keys(example):
        label = np.full((crop_h, crop_w), IGNORE_LABEL, example[key].dtype)
        label[:valid_h, :valid_w] = _resize_box(
            example[key], (valid_h, valid_w), box, Image.NEAREST
        )
        out[key] = label
    return out


class RandomScaleCrop(grain.transforms.RandomMap):
    """Random scale in `scale_range` then a random `crop_size` crop (padded if needed)."""

    def __init__(self, scale_range: tuple[float, float], crop_size: tuple[int, int]):
        self.scale_range = tuple(scale_range)
        self.crop_size = tuple(crop_size)

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        return self.draw(element, rng)

    def draw(self, element: Example, rng: np.random.Generator) -> Example:
        """One random scale and crop of `element`, from `rng`'s next numbers."""
        h, w = element["image"].shape[:2]
        scale = rng.uniform(*self.scale_range)
        scaled_h, scaled_w = max(1, round(h * scale)), max(1, round(w * scale))
        top = rng.integers(0, max(scaled_h - self.crop_size[0], 0) + 1)
        left = rng.integers(0, max(scaled_w - self.crop_size[1], 0) + 1)
        return scale_crop(element, scale, int(top), int(left), self.crop_size)


def flip(example: Example) -> Example:
    """Mirrors the image and every label map left-right."""
    out = dict(example)
    for key in ["image", *label_keys(example)]:
        out[key] = np.ascontiguousarray(example[key][:, ::-1])
    return out


class RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability 1/2."""

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        return flip(element) if rng.uniform() < 0.5 else element
