"""Tiny raw dataset trees in the real download layouts, with known labels.

Each `make_*_tree(root)` writes a few small images and labels and returns a
`FixtureTree` with the expected train-id label of every example, so tests can
compare prepared records pixel for pixel. Other modules' tests import these, and
`config_data` / `prepare` to prepare them in process.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib

import numpy as np
from PIL import Image

from wsda_jax import classes, config_lib
from wsda_jax.data import builders

HEIGHT, WIDTH = 32, 64
OUT_OF_MAP_ID = 250  # Not a Cityscapes labelId nor a SYNTHIA id.


@dataclasses.dataclass
class FixtureTree:
    """root: the manual_dir; labels: {name: uint8 (H, W) expected train ids};
    images: {name: uint8 (H, W, 3) as written}; info: per-dataset facts for tests."""

    root: str
    labels: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    info: dict[str, object] = dataclasses.field(default_factory=dict)


def scene_label(index: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """uint8 (H, W) train ids: sky / building / road bands, a car, a pole, an ignored strip.

    The classes shift with `index` so images differ; every band is a few pixels
    high so weak labels have room.
    """
    label = np.empty((height, width), np.uint8)
    label[: height // 4] = 10  # sky
    label[height // 4 : height // 2] = 2  # building
    label[height // 2 :] = 0  # road
    car = 13 if index % 2 == 0 else 18  # car or bicycle
    label[height // 2 + 2 : height // 2 + 8, 4 + index : 20 + index] = car
    label[height // 4 : height - 4, width - 10 : width - 8] = 5  # pole
    label[:, :2] = 255  # unlabelled strip
    if index % 3 == 1:
        label[height - 6 :, 30:50] = 1  # sidewalk
    return label


def random_image(index: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _inverse(lookup: np.ndarray, ignore_id: int) -> np.ndarray:
    """train id -> some source id mapping to it (255 -> ignore_id)."""
    inverse = np.full((256,), ignore_id, np.int64)
    for source_id in range(lookup.shape[0] - 1, -1, -1):
        if lookup[source_id] != 255:
            inverse[lookup[source_id]] = source_id
    return inverse


def save_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def save_palette_png(path: str, ids: np.ndarray) -> None:
    """A palette PNG whose indices are the ids, as GTA5 ships its labels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[: classes.CITYSCAPES_ID_TO_TRAIN.shape[0]] = classes.PALETTE[
        classes.CITYSCAPES_ID_TO_TRAIN
    ]
    image.putpalette(palette.ravel().tolist())
    image.save(path)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def encode_png_rgb16(array: np.ndarray) -> bytes:
    """uint16 (H, W, 3) -> 16-bit RGB PNG bytes; rows cycle through the five PNG filters
    (none, sub, up, average, paeth) so a reader is exercised on all of them."""
    height, width, _ = array.shape
    rows = np.ascontiguousarray(array.astype(">u2")).view(np.uint8).reshape(height, width * 6)
    rows = rows.astype(np.int64)
    bpp = 6
    out = []
    for y in range(height):
        raw = rows[y]
        prior = rows[y - 1] if y else np.zeros_like(raw)
        left = np.concatenate([np.zeros(bpp, np.int64), raw[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int64), prior[:-bpp]])
        kind = y % 5
        predictor = [
            np.zeros_like(raw),
            left,
            prior,
            (left + prior) // 2,
            _paeth(left, prior, upper_left),
        ][kind]
        out.append(bytes([kind]) + ((raw - predictor) % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(out)))
        + chunk(b"IEND", b"")
    )


def make_gta5_tree(
    root: str, num_images: int = 3, height: int = HEIGHT, width: int = WIDTH
) -> FixtureTree:
    """GTA5 layout `images/00001.png`, `labels/00001.png` (palette PNGs of labelIds).

    Image '00002' is larger than its label (a size mismatch); label '00001' has a
    2x3 block of id OUT_OF_MAP_ID (info['out_of_map_pixels'] = 6). The real GTA5
    size is 1052x1914 (height, width).
    """
    inverse = _inverse(classes.CITYSCAPES_ID_TO_TRAIN, ignore_id=0)
    labels, images = {}, {}
    for i in range(num_images):
        name = f"{i + 1:05d}"
        train = scene_label(i, height, width)
        ids = inverse[train]
        if i == 0:
            ids[10:12, 20:23] = OUT_OF_MAP_ID
            train = train.copy()
            train[10:12, 20:23] = 255
        image = random_image(i, height + 4, width + 6) if i == 1 else random_image(i, height, width)
        save_png(os.path.join(root, "images", f"{name}.png"), image)
        save_palette_png(os.path.join(root, "labels", f"{name}.png"), ids)
        labels[name], images[name] = train, image
    info = {"mismatched": ["00002"], "out_of_map_pixels": 6}
    return FixtureTree(root, labels, images, info)


def make_synthia_tree(
    root: str, num_images: int = 2, height: int = HEIGHT, width: int = WIDTH
) -> FixtureTree:
    """SYNTHIA-RAND-CITYSCAPES layout `RGB/0000000.png`, `GT/LABELS/0000000.png`.

    Labels are 16-bit RGB PNGs: red = SYNTHIA class id, green/blue = instance ids
    above 255 (which must not leak into the class). Label '0000000' has a 2x2
    block of id 300 (out of map, info['out_of_map_pixels'] = 4). The real size is
    760x1280 (height, width).
    """
    inverse = _inverse(classes.SYNTHIA_ID_TO_TRAIN, ignore_id=0)
    labels, images = {}, {}
    for i in range(num_images):
        name = f"{i:07d}"
        train = scene_label(i, height, width)
        gt = np.zeros((height, width, 3), np.uint16)
        gt[..., 0] = inverse[train]
        gt[..., 1] = 1000 + i
        gt[..., 2] = (np.arange(width) * 997) % 65536
        if i == 0:
            gt[3:5, 40:42, 0] = 300
            train = train.copy()
            train[3:5, 40:42] = 255
        os.makedirs(os.path.join(root, "GT", "LABELS"), exist_ok=True)
        with open(os.path.join(root, "GT", "LABELS", f"{name}.png"), "wb") as f:
            f.write(encode_png_rgb16(gt))
        image = random_image(100 + i, height, width)
        save_png(os.path.join(root, "RGB", f"{name}.png"), image)
        labels[name], images[name] = train, image
    return FixtureTree(root, labels, images, {"out_of_map_pixels": 4})


def coarse_of(train: np.ndarray) -> np.ndarray:
    """The fixture's gtCoarse in train ids: the fine label with a 3 px unlabelled frame
    around each band boundary and no small objects (car, bicycle, pole -> 255)."""
    coarse = train.copy()
    coarse[np.isin(train, (13, 18, 5, 1))] = 255
    height = train.shape[0]
    for row in (height // 4, height // 2):
        coarse[row - 3 : row + 3] = 255
    return coarse


def make_cityscapes_tree(
    root: str,
    cities: dict[str, tuple[str, ...]] | None = None,
    per_city: int = 2,
    with_val_coarse: bool = False,
    height: int = HEIGHT,
    width: int = WIDTH,
) -> FixtureTree:
    """Cityscapes layout with real file names: leftImg8bit, gtFine (labelIds and the
    colour images that must be ignored) and gtCoarse for train (and val if asked).
    The real size is 1024x2048 (height, width)."""
    cities = cities or {"train": ("aachen", "bochum"), "val": ("frankfurt",)}
    inverse = _inverse(classes.CITYSCAPES_ID_TO_TRAIN, ignore_id=0)
    labels, images, splits = {}, {}, {}
    index = 0
    for split, split_cities in cities.items():
        for city in split_cities:
            for j in range(per_city):
                name = f"{city}_{j:06d}_{19 + j:06d}"
                train = scene_label(index, height, width)
                image = random_image(200 + index, height, width)
                save_png(
                    os.path.join(root, "leftImg8bit", split, city, f"{name}_leftImg8bit.png"), image
                )
                fine_dir = os.path.join(root, "gtFine", split, city)
                save_png(
                    os.path.join(fine_dir, f"{name}_gtFine_labelIds.png"),
                    inverse[train].astype(np.uint8),
                )
                save_png(
                    os.path.join(fine_dir, f"{name}_gtFine_color.png"), classes.colorize(train)
                )
                if split == "train" or with_val_coarse:
                    coarse_ids = inverse[coarse_of(train)].astype(np.uint8)
                    coarse_dir = os.path.join(root, "gtCoarse", split, city)
                    save_png(os.path.join(coarse_dir, f"{name}_gtCoarse_labelIds.png"), coarse_ids)
                labels[name], images[name] = train, image
                splits[name] = split
                index += 1
    return FixtureTree(root, labels, images, {"splits": splits})


def make_folder_tree(root: str, num_images: int = 2, first: int = 0) -> FixtureTree:
    """A user dataset: `img/NAME_rgb.png` and `gt/NAME_ids.png` with ids = train id + 1
    (0 = ignore), for an explicit id map {0: 255, k + 1: k}; scenes first, first + 1, ..."""
    labels, images = {}, {}
    for i in range(first, first + num_images):
        name = f"scene{i}"
        train = scene_label(i)
        ids = np.where(train == 255, 0, train.astype(np.int64) + 1).astype(np.uint8)
        image = random_image(300 + i)
        save_png(os.path.join(root, "img", f"{name}_rgb.png"), image)
        save_png(os.path.join(root, "gt", f"{name}_ids.png"), ids)
        labels[name], images[name] = train, image
    id_map = {0: 255, **{k + 1: k for k in range(classes.NUM_CLASSES)}}
    return FixtureTree(root, labels, images, {"id_map": id_map})


def config_data(data_dir, manual_dir="", pre_resize=False):
    """config.data for the tiny fixture trees; the reference pre-resize (which would blow
    32x64 fixtures up to 1280x720) only where a test asks for it."""
    config_data = config_lib.base_config().data
    config_data.data_dir = str(data_dir)
    config_data.manual_dir = str(manual_dir)
    config_data.pre_resize = pre_resize
    config_data.num_workers = 1
    config_data.points_per_class = 2
    config_data.synthetic.height = 32
    config_data.synthetic.width = 64
    config_data.synthetic.num_source = 2
    config_data.synthetic.num_target_train = 3
    config_data.synthetic.num_target_val = 2
    return config_data


def prepare(dataset, data_dir, manual_dir, pre_resize=False, **kwargs):
    """Prepares `dataset` from the tree at `manual_dir` into `data_dir` (in process)."""
    config_data_ = config_data(data_dir, manual_dir, pre_resize)
    return builders.prepare(builders.make_builder(dataset, config_data_, **kwargs))
