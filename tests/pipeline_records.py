"""Tiny in-memory records and configs shared by the pipeline tests: every record's image is
a constant that names it, so a pixel of a batch traces the record it came from."""

import numpy as np

from wsda_jax import config_lib
from wsda_jax.data import records

H, W, C = 32, 64, 19


def make_records(num, *, target, first=0, image_format="png", noise=False):
    """Records whose image is the constant `first + i + 1` (plus, with `noise`, a fixed
    random pattern), so a pixel traces the record."""
    out = []
    for i in range(first, first + num):
        example = {
            "image": np.full((H, W, 3), i + 1, np.uint8)
            + (np.random.default_rng(i).integers(0, 100, (H, W, 3), np.uint8) if noise else 0),
            "label": np.full((H, W), 3, np.uint8),
            "name": f"record_{i}",
        }
        if target:
            example["coarse_label"] = (
                np.where(np.arange(W) < W // 2, 1, 255).astype(np.uint8)[None].repeat(H, 0)
            )
            example["point_label"] = np.full((H, W), 255, np.uint8)
            example["point_label"][5, 7] = 2
            example["presence"] = (np.arange(C) % 3 == i % 3).astype(np.uint8)
        out.append(records.encode_example(example, image_format))
    return out


def pipeline_config(*, augment=False, weak_label="coarse", batch_size=2, seed=0, num_workers=0):
    """base_config with small batches; without `augment`, identity transforms."""
    config = config_lib.base_config()
    config.seed = seed
    config.per_device_batch_size = batch_size
    config.weak_label = weak_label
    config.data.num_workers = num_workers
    config.data.prefetch_buffer_size = 2
    config.eval.per_device_batch_size = 2
    if augment:
        config.data.crop_size = (24, 40)
        config.data.scale_range = (0.5, 2.0)
    else:  # identity transforms so that pixels trace records
        config.data.crop_size = (H, W)
        config.data.scale_range = (1.0, 1.0)
        config.data.flip = False
    return config


SOURCE = make_records(5, target=False)
TARGET = make_records(7, target=True, first=100)


def take(iterator, n):
    """The next `n` batches of `iterator`."""
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    """Two lists of train batches are equal array by array."""
    for x, y in zip(a, b, strict=True):
        for domain in ("source", "target"):
            for key in x[domain]:
                np.testing.assert_array_equal(x[domain][key], y[domain][key])
