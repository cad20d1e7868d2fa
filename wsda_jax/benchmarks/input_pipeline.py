"""Throughput of the training input pipeline on Cityscapes-sized records.

    python -m wsda_jax.benchmarks.input_pipeline [--num_records 16] [--steps 10]

Builds PNG records of 2048x1024 procedural target-domain scenes (with sensor
noise, so the PNGs are about as hard to decode as photos) in memory, then times
`pipeline.make_train_iterator` with 512x512 crops, batch 4 source + 4 target,
scale 0.5-2 and colour jitter, for 0, 1 and 2 worker processes. Prints a
markdown table of steps/s and images/s (source + target images). Not a test:
numbers depend on the host's free cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from wsda_jax import config_lib
from wsda_jax.data import pipeline, records, synthetic

HEIGHT, WIDTH = 1024, 2048


def make_records(num: int, *, target: bool) -> list[dict]:
    """`num` encoded records of full-resolution scenes (target records with weak labels)."""
    out = []
    for i in range(num):
        example = synthetic.render_example("target", i, seed=1, height=HEIGHT, width=WIDTH)
        example["name"] = f"bench_{i}"
        if target:
            coarse = example["label"].copy()
            coarse[::4] = 255  # some unlabelled area, like gtCoarse
            example["coarse_label"] = coarse
            example["presence"] = np.bincount(example["label"].ravel(), minlength=19)[:19] > 0
            example["presence"] = example["presence"].astype(np.uint8)
        out.append(records.encode_example(example))
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
    assert batch["source"]["image"].shape == (config.batch_size, 512, 512, 3)
    if config.data.num_workers:
        iterator.close()
    return first, per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_records", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    start = time.perf_counter()
    source = make_records(args.num_records, target=False)
    target = make_records(args.num_records, target=True)
    megabytes = sum(len(r["image"]) for r in target) / len(target) / 2**20
    print(
        f"built {2 * args.num_records} records of {WIDTH}x{HEIGHT} in "
        f"{time.perf_counter() - start:.1f} s (image PNG {megabytes:.2f} MiB each)\n"
    )
    config = config_lib.base_config()
    config.batch_size = 4
    config.weak_label = "coarse"
    config.data.crop_size = (512, 512)
    config.data.scale_range = (0.5, 2.0)
    config.data.jitter = 0.25

    print("| workers | first batch (s) | step (s) | steps/s | images/s (src+tgt) |")
    print("| --- | --- | --- | --- | --- |")
    for workers in args.workers:
        config.data.num_workers = workers
        first, per_step = time_pipeline(
            config, source, target, warmup=args.warmup, steps=args.steps
        )
        images = 2 * config.batch_size / per_step
        print(f"| {workers} | {first:.2f} | {per_step:.3f} | {1 / per_step:.2f} | {images:.1f} |")


if __name__ == "__main__":
    main()
