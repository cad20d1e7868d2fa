"""Throughput of the training input pipeline on Cityscapes-sized records.

    python -m wsda_jax.benchmarks.input_pipeline --num_records=16 --steps=10 \
        [--record_size=512,1024]

Builds PNG records of procedural target-domain scenes at --record_size (height,
width; default 1024,2048 = full-size Cityscapes; 512,1024 = Cityscapes train after
the pre-resize) with pixel noise, so the PNGs are about as hard to decode as
photos, in memory, then times
`pipeline.make_train_iterator` with 512x512 crops, batch 4 source + 4 target,
scale 0.5-2 and colour jitter, for 0, 1 and 2 worker processes. Prints a
markdown table of steps/s and images/s (source + target images). Not a test:
numbers depend on the host's free cores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from PIL import Image

from wsda_jax import config_lib
from wsda_jax.data import pipeline, records, synthetic

HEIGHT, WIDTH = 1024, 2048


def make_records(num: int, height: int = HEIGHT, width: int = WIDTH) -> list[dict]:
    """`num` encoded target-style records (image, label, coarse_label, presence, name).

    Scenes are rendered at 1/4 size, upscaled to (height, width) and given +-3 of
    pixel noise, which makes PNGs of a few MiB like Cityscapes' photos (rendering at
    full size would take a minute). The source side reads 'image' and 'label'
    of the same records.
    """
    rng = np.random.default_rng(0)
    out = []
    for i in range(num):
        small = synthetic.render_example("target", i, seed=1, height=height // 4, width=width // 4)
        image = Image.fromarray(small["image"]).resize((width, height), Image.BILINEAR)
        noise = rng.integers(-3, 4, (height, width, 3), dtype=np.int16)
        image = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
        label = np.asarray(Image.fromarray(small["label"]).resize((width, height), Image.NEAREST))
        coarse = label.copy()
        coarse[::4] = 255  # some unlabelled area, like gtCoarse
        presence = (np.bincount(label.ravel(), minlength=256)[:19] > 0).astype(np.uint8)
        example = {"image": image, "label": label, "coarse_label": coarse, "presence": presence}
        out.append(records.encode_example({**example, "name": f"bench_{i}"}))
    return out


def time_pipeline(config, source, target, *, warmup: int, steps: int) -> tuple[float, float]:
    """Returns (seconds to the first batch, seconds per step after `warmup` steps)."""
    start = time.perf_counter()
    iterator = pipeline.make_train_iterator(config, source, target)
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
    per_step = (time.perf_counter() - start) / steps
    assert batch["source"]["image"].shape == (config.per_device_batch_size, 512, 512, 3)
    if config.data.num_workers:
        iterator.close()
    return first, per_step


_NUM_RECORDS = flags.DEFINE_integer("num_records", 16, "Records built in memory.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed batches per worker count.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches after the first one.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker-process counts to time.")
_RECORD_SIZE = flags.DEFINE_list(
    "record_size", [str(HEIGHT), str(WIDTH)], "Record height,width (512,1024 = pre-resized)."
)


def main(argv: Sequence[str]) -> None:
    del argv
    if _NUM_RECORDS.value < 1 or _STEPS.value < 1 or _WARMUP.value < 0:
        raise app.UsageError("--num_records and --steps must be positive, --warmup >= 0")

    height, width = (int(side) for side in _RECORD_SIZE.value)
    start = time.perf_counter()
    source = target = make_records(_NUM_RECORDS.value, height, width)
    megabytes = sum(len(r["image"]) for r in target) / len(target) / 2**20
    print(
        f"built {_NUM_RECORDS.value} records of {width}x{height} in "
        f"{time.perf_counter() - start:.1f} s (image PNG {megabytes:.2f} MiB each)\n"
    )
    config = config_lib.base_config()
    config.per_device_batch_size = 4
    config.weak_label = "coarse"
    config.data.crop_size = (512, 512)
    config.data.scale_range = (0.5, 2.0)
    config.data.jitter = 0.25

    print("| workers | first batch (s) | step (s) | steps/s | images/s (src+tgt) |")
    print("| --- | --- | --- | --- | --- |")
    for workers in [int(w) for w in _WORKERS.value]:
        config.data.num_workers = workers
        first, per_step = time_pipeline(
            config, source, target, warmup=_WARMUP.value, steps=_STEPS.value
        )
        images = 2 * config.per_device_batch_size / per_step
        print(f"| {workers} | {first:.2f} | {per_step:.3f} | {1 / per_step:.2f} | {images:.1f} |")


if __name__ == "__main__":
    app.run(main)
