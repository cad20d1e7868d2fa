r"""Throughput of the training input pipeline, per second and per busy core.

    python -m wsda_jax.tools.benchmarks.input_pipeline --steps=20 --workers=0,1,2 \
        [--image_format=npy,png] [--source_size=720,1280] [--target_size=512,1024]

Builds records of procedural scenes in memory: source records at --source_size
(height,width; default GTA5 after the pre-resize, 1280x720) and target records at
--target_size (default Cityscapes train after the pre-resize, 1024x512), with pixel
noise so that PNGs are about as hard to decode as photos. Then times
`pipeline.make_train_iterator` with the reference's augmentation (512x512 crops,
scale 0.5-2, flip), batch 4 source + 4 target, for each image format and worker
count: training batches exactly as the step receives them.

"Busy cores" is the CPU time (user + system) of this process and its grain workers
divided by the wall time of the timed steps, so "images/s per core" = images / CPU
seconds is a property of the code rather than of how idle the machine is; the last
column is the cores one GPU needs to be fed `--gpu_images_per_s` (170: the
reference-size step at a good fraction of an H100's bf16 peak, docs/benchmarks.md,
"Input pipeline"). Not a test: wall-clock numbers depend on the host's free cores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import psutil
from absl import app, flags
from PIL import Image

from wsda_jax import cli_errors, config_lib
from wsda_jax.data import pipeline, records, synthetic

SOURCE_SIZE = (720, 1280)  # GTA5 after the pre-resize (docs/method.md §12).
TARGET_SIZE = (512, 1024)  # Cityscapes train after the pre-resize.


def make_records(
    num: int, height: int, width: int, image_format: str = "png", domain: str = "target"
) -> list[dict]:
    """`num` encoded records (image, label, coarse_label, presence, name) of `domain`.

    Scenes are rendered at 1/4 size, upscaled to (height, width) and given +-3 of
    pixel noise, which makes PNGs about as large as photos' (rendering at full size
    would take a minute). Source pipelines read only 'image' and 'label'.
    """
    rng = np.random.default_rng(0)
    out = []
    for i in range(num):
        small = synthetic.render_example(domain, i, seed=1, height=height // 4, width=width // 4)
        image = Image.fromarray(small["image"]).resize((width, height), Image.BILINEAR)
        noise = rng.integers(-3, 4, (height, width, 3), dtype=np.int16)
        image = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
        label = np.asarray(Image.fromarray(small["label"]).resize((width, height), Image.NEAREST))
        coarse = label.copy()
        coarse[::4] = 255  # some unlabelled area, like gtCoarse
        presence = (np.bincount(label.ravel(), minlength=256)[:19] > 0).astype(np.uint8)
        example = {"image": image, "label": label, "coarse_label": coarse, "presence": presence}
        out.append(records.encode_example({**example, "name": f"bench_{i}"}, image_format))
    return out


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of `process` and its live descendants (grain workers)."""
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def time_pipeline(config, source, target, *, warmup: int, steps: int) -> dict[str, float]:
    """Seconds to the first batch, then wall and CPU seconds per step after `warmup`."""
    process = psutil.Process()
    start = time.perf_counter()
    iterator = pipeline.make_train_iterator(config, source, target)
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(warmup):
        next(iterator)
    start, cpu_start = time.perf_counter(), cpu_seconds(process)
    for _ in range(steps):
        batch = next(iterator)
    wall = (time.perf_counter() - start) / steps
    cpu = (cpu_seconds(process) - cpu_start) / steps
    crop = tuple(config.data.crop_size)
    assert batch["source"]["image"].shape == (config.per_device_batch_size, *crop, 3)
    if config.data.num_workers:
        iterator.close()
    return {"first": first, "wall": wall, "cpu": cpu}


_NUM_RECORDS = flags.DEFINE_integer("num_records", 16, "Records per domain built in memory.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed batches per setting.")
_WARMUP = flags.DEFINE_integer("warmup", 4, "Untimed batches after the first one.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker-process counts to time.")
_IMAGE_FORMAT = flags.DEFINE_list("image_format", ["npy", "png"], "Record image formats.")
_STAGE = flags.DEFINE_enum(
    "stage", "adapt", ["adapt", "source_only"], "source_only: the source stream alone."
)
_SOURCE_SIZE = flags.DEFINE_list("source_size", list(map(str, SOURCE_SIZE)), "height,width.")
_TARGET_SIZE = flags.DEFINE_list("target_size", list(map(str, TARGET_SIZE)), "height,width.")
_GPU_RATE = flags.DEFINE_float("gpu_images_per_s", 170.0, "Images/s one GPU consumes.")


def main(argv: Sequence[str]) -> None:
    del argv
    if _NUM_RECORDS.value < 1 or _STEPS.value < 1 or _WARMUP.value < 0:
        raise app.UsageError("--num_records and --steps must be positive, --warmup >= 0")
    unknown = set(_IMAGE_FORMAT.value) - set(records.IMAGE_FORMATS)
    if unknown:
        raise app.UsageError(f"--image_format: unknown {sorted(unknown)}")
    source_size = tuple(int(side) for side in _SOURCE_SIZE.value)
    target_size = tuple(int(side) for side in _TARGET_SIZE.value)
    config = config_lib.base_config()
    config.per_device_batch_size = 4
    config.stage = _STAGE.value
    config.weak_label = "coarse"
    config.data.crop_size = (512, 512)
    config.data.scale_range = (0.5, 2.0)
    images_per_step = (2 if config.stage == "adapt" else 1) * config.per_device_batch_size
    print(
        f"stage={config.stage}, source {source_size[1]}x{source_size[0]}, "
        f"target {target_size[1]}x{target_size[0]}, {images_per_step} images per step, "
        f"{psutil.cpu_count()} cores, load average {psutil.getloadavg()[0]:.1f}\n"
    )
    print(
        "| image format | workers | first batch (s) | images/s | busy cores "
        f"| images/s per core | cores per GPU at {_GPU_RATE.value:.0f}/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for image_format in _IMAGE_FORMAT.value:
        source = make_records(_NUM_RECORDS.value, *source_size, image_format, "source")
        target = make_records(_NUM_RECORDS.value, *target_size, image_format, "target")
        for workers in [int(w) for w in _WORKERS.value]:
            config.data.num_workers = workers
            t = time_pipeline(config, source, target, warmup=_WARMUP.value, steps=_STEPS.value)
            per_core = images_per_step / t["cpu"]
            print(
                f"| {image_format} | {workers} | {t['first']:.2f} "
                f"| {images_per_step / t['wall']:.1f} | {t['cpu'] / t['wall']:.2f} "
                f"| {per_core:.1f} | {_GPU_RATE.value / per_core:.1f} |"
            )


if __name__ == "__main__":
    cli_errors.run_tool(main)
