r"""Writes training batches as the train step receives them: PNG panels and a JSON summary.

  python -m wsda_jax.tools.browse --config=configs/gta2cs_coarse.py --out=/tmp/batches \
      --num_batches=4 [--config.data.data_dir=...]

For each of `--num_batches` batches of ONE device's share (config.per_device_batch_size
source + target images, after the pre-resize, random scale, crop and flip; before the
step's colour jitter, ClassMix and strong augmentation, which run on the device) it writes
`OUT/batch{i}_{j}.png` per image pair (source image | source label | target image |
target weak label, with the presence vector's class names as a caption) and
`OUT/batches.json`, one entry per pair:

  {"batch": i, "pair": j, "source_shape": [H, W], "target_shape": [H, W],
   "presence": [class ids the image-level losses see],
   "weak_label_classes": [class ids present in the weak label crop]}

The presence vector is computed by the step's own function (`step_inputs.target_weak_labels`),
so what is shown is what the losses see. Stage-1 and oracle configs read no target
stream: their panels show the source pair only, with "target_shape": null.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

from wsda_jax import classes, cli_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the panels and batches.json.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 2, "Batches to write (>= 1).")
flags.mark_flags_as_required(["config", "out"])

CAPTION_HEIGHT = 14


def class_ids(label: np.ndarray, num_classes: int) -> list[int]:
    """Sorted train ids in [0, num_classes) that label at least one pixel."""
    values = np.unique(np.asarray(label))
    return [int(v) for v in values if 0 <= v < num_classes]


def panel(
    source_image: np.ndarray,
    source_label: np.ndarray,
    target_image: np.ndarray | None,
    weak_label: np.ndarray | None,
    caption: str,
) -> np.ndarray:
    """uint8 (CAPTION_HEIGHT + H, 4 W (2 W without a target), 3): the crops side by side
    under a caption."""
    crops = [source_image, classes.colorize(source_label)]
    if target_image is not None:
        crops += [target_image, classes.colorize(weak_label)]
    row = np.concatenate(crops, axis=1)
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + CAPTION_HEIGHT), (255, 255, 255))
    canvas.paste(Image.fromarray(row), (0, CAPTION_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 1), caption, fill=(0, 0, 0))
    return np.asarray(canvas)


def describe_batch(batch: dict, config, batch_index: int) -> list[dict]:
    """The batches.json entries of one host batch (see the module docstring)."""
    from wsda_jax import step_inputs  # JAX only when a batch is described.

    target = batch.get("target")
    if target is not None:
        presence = np.asarray(step_inputs.target_weak_labels(target, config)[1])
    entries = []
    for j in range(batch["source"]["image"].shape[0]):
        entry = {
            "batch": batch_index,
            "pair": j,
            "source_shape": list(batch["source"]["image"].shape[1:3]),
            "target_shape": None,
            "presence": [],
            "weak_label_classes": [],
        }
        if target is not None:
            entry.update(
                target_shape=list(target["image"].shape[1:3]),
                presence=[int(c) for c in np.flatnonzero(presence[j] > 0)],
                weak_label_classes=class_ids(target["weak_label"][j], config.num_classes),
            )
        entries.append(entry)
    return entries


def write_batches(config, out_dir: str, num_batches: int) -> list[dict]:
    """Writes the panels and batches.json for `num_batches` batches; returns the entries."""
    from wsda_jax import config_lib
    from wsda_jax.data import pipeline, sources

    config_lib.validate(config, num_devices=1)
    if num_batches < 1:
        raise ValueError(f"--num_batches={num_batches}: must be >= 1")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out={out_dir!r} is a file, not a folder")
    os.makedirs(out_dir, exist_ok=True)
    data = sources.open_datasets(config)
    iterator = pipeline.make_train_iterator(
        config,
        data.source,
        data.target,
        source_class_pixels=sources.source_class_pixels(config, data.source),
    )
    entries = []
    try:
        for i in range(num_batches):
            batch = next(iterator)
            batch_entries = describe_batch(batch, config, i)
            target = batch.get("target")
            for entry in batch_entries:
                j = entry["pair"]
                names = [classes.CLASS_NAMES[c] for c in entry["presence"]]
                image = panel(
                    batch["source"]["image"][j],
                    batch["source"]["label"][j],
                    None if target is None else target["image"][j],
                    None if target is None else target["weak_label"][j],
                    "presence: " + (", ".join(names) or "none"),
                )
                Image.fromarray(image).save(os.path.join(out_dir, f"batch{i}_{j}.png"))
            entries += batch_entries
    finally:
        iterator.close()
    with open(os.path.join(out_dir, "batches.json"), "w") as f:
        json.dump(entries, f, indent=1)
    return entries


def main(argv: list[str]) -> None:
    del argv
    entries = write_batches(_CONFIG.value, os.path.expanduser(_OUT.value), _NUM_BATCHES.value)
    print(f"Wrote {len(entries)} image pairs to {_OUT.value} (panels and batches.json).")


if __name__ == "__main__":
    cli_errors.run_tool(main)
