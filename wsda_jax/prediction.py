"""The predict mode: colourised predictions of a folder of images (`predict_directory`),
each process its share of the sorted names."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
import PIL.Image
from absl import logging

from wsda_jax import classes
from wsda_jax.evaluation import predict_labels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_predict_dirs(input_dir: str, output_dir: str) -> None:
    """Raises a one-line ValueError unless `input_dir` is a folder that differs from
    `output_dir`, and `output_dir` is a folder or absent (writing into the input folder
    could overwrite the user's images)."""
    if not os.path.isdir(input_dir):
        raise ValueError(f"--input_dir={input_dir!r} is not a directory")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir={output_dir!r} is a file, not a folder")
    if os.path.realpath(input_dir) == os.path.realpath(output_dir):
        raise ValueError(
            f"--output_dir={output_dir!r} is the input folder: choose another folder, so "
            "that no input image is overwritten"
        )


def output_names(names: Iterable[str]) -> dict[str, str]:
    """A distinct PNG name per input name: 'x.png' for 'x.jpg', but 'x_png.png' and
    'x_jpg.png' when both 'x.png' and 'x.jpg' are inputs."""
    names = list(names)
    stems = [os.path.splitext(name)[0] for name in names]
    taken: set[str] = set()
    out = {}
    for name, stem in zip(names, stems, strict=True):
        suffix = os.path.splitext(name)[1][1:]
        candidate = f"{stem}.png" if stems.count(stem) == 1 else f"{stem}_{suffix}.png"
        index = 1
        while candidate in taken:  # 'x_png' and 'x.png' + 'x.jpg' all given: rare.
            candidate = f"{stem}_{suffix}_{index}.png"
            index += 1
        taken.add(candidate)
        out[name] = candidate
    return out


def _read_rgb(path: str) -> np.ndarray | None:
    """The image as uint8 (H, W, 3), or None (with a warning) if it cannot be decoded."""
    try:
        with PIL.Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        logging.warning("Skipped %s: not a readable image (%s).", path, error)
        return None


def predict_directory(
    config: ml_collections.ConfigDict,
    variables: Any,
    input_dir: str,
    output_dir: str,
    *,
    model: Any,
) -> list[str]:
    """Colourised predictions of every PNG/JPEG in `input_dir`, as PNGs in `output_dir`.

    Unreadable files are skipped with a warning each and counted; output names are
    distinct (`output_names`); `output_dir` must not be `input_dir`. With several
    processes each predicts and writes every `process_count`-th image (its share of the
    sorted names) and returns the paths it wrote.
    """
    check_predict_dirs(input_dir, output_dir)
    names = sorted(n for n in os.listdir(input_dir) if n.lower().endswith(IMAGE_SUFFIXES))
    # Regular files only: opening a FIFO (or a device) named x.png would block.
    for name in [n for n in names if not os.path.isfile(os.path.join(input_dir, n))]:
        logging.warning("Skipped %s: not a regular file.", os.path.join(input_dir, name))
        names.remove(name)
    if not names:
        raise ValueError(f"--input_dir={input_dir}: no .png/.jpg/.jpeg images")
    os.makedirs(output_dir, exist_ok=True)
    share = list(output_names(names).items())[jax.process_index() :: jax.process_count()]
    if not share:  # Fewer images than processes.
        return []
    written, skipped = [], 0
    for name, out_name in share:
        pixels = _read_rgb(os.path.join(input_dir, name))
        if pixels is None:
            skipped += 1
            continue
        label = predict_labels(config, variables, pixels[None], model=model)[0]
        path = os.path.join(output_dir, out_name)
        PIL.Image.fromarray(classes.colorize(label)).save(path)
        written.append(path)
    if skipped:
        logging.warning(
            "Skipped %d of %d images in %s (unreadable).", skipped, len(share), input_dir
        )
    if not written:
        raise ValueError(f"--input_dir={input_dir}: none of its {len(share)} images is readable")
    return written
