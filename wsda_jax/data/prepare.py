r"""Prepares a dataset to ArrayRecord under --data_dir and prints the summary.

  python -m wsda_jax.data.prepare --dataset=cityscapes_weak \
      --manual_dir=/data/cityscapes --data_dir=~/tensorflow_datasets --num_workers=8

Datasets: gta5 (gta5/skip), synthia, cityscapes_weak (cityscapes_weak/synthetic_coarse),
folder_pairs/NAME (with --image_glob, --label_glob, --id_map, optionally --val_image_glob
and --val_label_glob, --weak_labels), synthetic_source,
synthetic_target. An interrupted run leaves only an `incomplete.*` folder, which the
next preparation of the same dataset removes (saying so). Bad input (wrong layout, an
unreadable image, an image/label size mismatch, a bad flag value) prints one line on
stderr (the layout error: what was expected and what was found) and exits with status 1.
"""

from __future__ import annotations

import json
import sys
import traceback

from absl import flags, logging

from wsda_jax import cli_errors, config_lib
from wsda_jax.data import builders

_DATASET = flags.DEFINE_string("dataset", None, "Dataset name, e.g. gta5 or folder_pairs/mine.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", "", "The raw download (not needed for synthetic_*)."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "~/tensorflow_datasets", "Where prepared datasets live."
)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 4, "Processes that decode and encode images.")
_POINTS = flags.DEFINE_integer("points_per_class", 1, "Point labels per present class (targets).")
_PRE_RESIZE = flags.DEFINE_bool(
    "pre_resize",
    True,
    "gta5 and cityscapes_weak: store the training split at the reference's working size "
    "(GTA5 1280x720, Cityscapes train 1024x512); matches config.data.pre_resize.",
)
_IMAGE_FORMAT = flags.DEFINE_enum(
    "image_format",
    "npy",
    ["npy", "png"],
    "How records store images: npy (raw, fastest to read) or png (compact); matches "
    "config.data.image_format.",
)
_IMAGE_GLOB = flags.DEFINE_string("image_glob", "images/*.png", "folder_pairs: image pattern.")
_LABEL_GLOB = flags.DEFINE_string("label_glob", "labels/*.png", "folder_pairs: label pattern.")
_VAL_IMAGE_GLOB = flags.DEFINE_string(
    "val_image_glob", "", "folder_pairs: image pattern of a 'val' split (needs val_label_glob)."
)
_VAL_LABEL_GLOB = flags.DEFINE_string(
    "val_label_glob", "", "folder_pairs: label pattern of a 'val' split (needs val_image_glob)."
)
_ID_MAP = flags.DEFINE_string(
    "id_map",
    "identity",
    "folder_pairs: cityscapes, synthia, identity or a JSON dict {id: train id}.",
)
_SIZE_MISMATCH = flags.DEFINE_enum(
    "size_mismatch",
    "error",
    ["error", "resize", "skip"],
    "folder_pairs: image/label size mismatch.",
)
_WEAK_LABELS = flags.DEFINE_bool("weak_labels", False, "folder_pairs: add target weak labels.")
flags.mark_flag_as_required("dataset")


def _folder_pairs_options() -> dict:
    id_map = _ID_MAP.value
    if id_map.lstrip().startswith("{"):
        try:
            id_map = dict(json.loads(id_map))  # Its entries: builders.base.label_map_from_spec.
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"--id_map={id_map!r} is not a JSON dict {{id: train id}}: {error}"
            ) from error
    try:  # Before any file is read.
        builders.base.label_map_from_spec(id_map)
    except ValueError as error:
        raise ValueError(f"--id_map={_ID_MAP.value!r}: {error}") from error
    return {
        "image_glob": _IMAGE_GLOB.value,
        "label_glob": _LABEL_GLOB.value,
        "val_image_glob": _VAL_IMAGE_GLOB.value,
        "val_label_glob": _VAL_LABEL_GLOB.value,
        "id_map": id_map,
        "size_mismatch": _SIZE_MISMATCH.value,
        "weak_labels": _WEAK_LABELS.value,
        "points_per_class": _POINTS.value,
    }


def _message(error: BaseException) -> str:
    """The error in one line; a layout error keeps its lines (expected vs found)."""
    if isinstance(error, builders.layout.LayoutError):
        return str(error)
    text = str(error)
    if isinstance(error, KeyError) and text[:1] in "'\"":
        text = text[1:-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or repr(error)


def main(argv: list[str]) -> None:
    try:
        _prepare(argv)
    except (ValueError, OSError, KeyError) as error:  # LayoutError is an OSError.
        logging.debug("%s", traceback.format_exc())  # Shown with --verbosity=1.
        print(f"error: {_message(error)}", file=sys.stderr)
        sys.exit(1)


def _prepare(argv: list[str]) -> None:
    del argv
    config_data = config_lib.base_config().data
    config_data.data_dir = _DATA_DIR.value
    config_data.manual_dir = _MANUAL_DIR.value
    config_data.points_per_class = _POINTS.value
    config_data.pre_resize = _PRE_RESIZE.value
    config_data.image_format = _IMAGE_FORMAT.value
    dataset = _DATASET.value
    options = _folder_pairs_options() if dataset.startswith("folder_pairs") else None
    builder = builders.make_builder(
        dataset, config_data, options=options, num_workers=_NUM_WORKERS.value
    )
    summary = builders.prepare(builder)
    print(f"Prepared {dataset} in {builder.data_path}")
    print(json.dumps(summary, indent=1, sort_keys=True))


if __name__ == "__main__":
    cli_errors.run_tool(main)
