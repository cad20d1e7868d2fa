r"""How much of each class the weak labels of a prepared target dataset keep.

    python -m wsda_jax.tools.experiments.weak_label_coverage --config=configs/synthetic_coarse.py

Reads `config.data.target` (split `--split`, prepared or, for the embedded dataset,
generated on first use) and prints a markdown table: per class, the images whose
fine label contains it, the share of those in which the coarse label and the point
label still mark it, and the share of its fine pixels the coarse label keeps. It
shows which classes a weak-label kind cannot teach (e.g. thin objects that coarse
polygons erase), which explains per-class results of the weak-label variants.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from wsda_jax import classes, cli_errors
from wsda_jax.data import records, sources

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose target is read.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "val"], "Split of the target.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Read only the first N images (0 = all).")


def coverage(examples: Iterable[dict[str, np.ndarray]], num_classes: int) -> dict[str, np.ndarray]:
    """Per-class counts over `examples` (decoded records with label, coarse_label,
    point_label: int [H, W], 255 = unlabelled).

    Returns int64 [num_classes] arrays: 'images' (fine label has the class),
    'images_coarse' / 'images_point' (of those, the weak label marks it too),
    'pixels' (fine pixels) and 'pixels_coarse' (fine pixels the coarse label keeps).
    """
    counts = {
        name: np.zeros(num_classes, np.int64)
        for name in ("images", "images_coarse", "images_point", "pixels", "pixels_coarse")
    }
    ids = np.arange(num_classes)
    for example in examples:
        label, coarse, point = (example[k] for k in ("label", "coarse_label", "point_label"))
        pixels = np.bincount(label[label < num_classes].ravel(), minlength=num_classes)
        kept = label == coarse
        pixels_coarse = np.bincount(label[kept & (label < num_classes)], minlength=num_classes)
        present = pixels > 0
        counts["images"] += present
        counts["images_coarse"] += present & np.isin(ids, coarse)
        counts["images_point"] += present & np.isin(ids, point)
        counts["pixels"] += pixels
        counts["pixels_coarse"] += pixels_coarse
    return counts


def format_table(counts: dict[str, np.ndarray], names: Sequence[str]) -> str:
    """Markdown table of `coverage` counts, shares in %."""
    share = lambda part, whole: f"{100 * part / whole:.0f}" if whole else "n/a"
    lines = [
        "| class | images with the class | coarse marks it (% of those) "
        "| points mark it (% of those) | fine pixels kept by coarse (%) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for c, name in enumerate(names):
        images = counts["images"][c]
        lines.append(
            f"| {name} | {images} | {share(counts['images_coarse'][c], images)} "
            f"| {share(counts['images_point'][c], images)} "
            f"| {share(counts['pixels_coarse'][c], counts['pixels'][c])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    source = sources.open_split(config.data.target, _SPLIT.value, config.data)
    count = len(source) if _MAX_IMAGES.value <= 0 else min(len(source), _MAX_IMAGES.value)
    examples = (records.decode_example(source[i]) for i in range(count))
    examples = tqdm(examples, total=count, desc=f"{config.data.target} {_SPLIT.value}")
    counts = coverage(examples, config.num_classes)
    print(f"{config.data.target}, split {_SPLIT.value}, {count} images\n")
    print(format_table(counts, classes.CLASS_NAMES[: config.num_classes]))


if __name__ == "__main__":
    cli_errors.run_tool(main)
