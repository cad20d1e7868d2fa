"""Reading raw image and label files, and the reference's fixed pre-resize (Pillow)."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from wsda_jax.data import records


class PreparationError(ValueError):
    """An input file could not be used (corrupt PNG, size mismatch); names the file."""


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB; the error names the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"), np.uint8)
    except Exception as error:
        raise PreparationError(f"cannot read image {path}: {error}") from error


def read_label_ids(path: str) -> np.ndarray:
    """Integer (H, W) label ids from a PNG.

    Single-channel PNGs (8-bit grey, or palette as in GTA5, where the palette index
    is the id) give their values; 16-bit 3-channel PNGs (SYNTHIA) give the red
    channel. The error names the file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) > 26 and data.startswith(records.PNG_SIGNATURE):
            bit_depth, color_type = struct.unpack(">BB", data[24:26])
            if bit_depth == 16 and color_type == 2:
                return records.read_png_rgb16(data)[..., 0]
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"expected single-channel label ids, got mode {image.mode}")
            return np.asarray(image)
    except Exception as error:
        raise PreparationError(f"cannot read label {path}: {error}") from error


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) bilinearly resized to (height, width)."""
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.uint8)


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) label map resized to (height, width), nearest neighbour."""
    resized = Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized, np.uint8)


def pre_resize(
    image: np.ndarray, labels: dict[str, np.ndarray], size: tuple[int, int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The reference's fixed resize before augmentation: image bilinear, labels nearest
    (Pillow, as the reference). size = (height, width)."""
    height, width = size
    resized = {key: resize_label(value, height, width) for key, value in labels.items()}
    return resize_image(image, height, width), resized
