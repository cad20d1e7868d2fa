"""Inference and evaluation on the target val split: logits, confusion, IoU/mIoU, reports.

`predict` is the eval-mode forward (single- or multi-scale, optional flip; docs/method.md
§13) and `eval_step` its per-device confusion matrix, psum-ed over devices.
`evaluate` streams the padded eval batches (decoded once for the student and the
teacher) through the jitted `eval_step` and sums the per-batch confusion matrices on
the host in int64 once the pass is dispatched, so the loop never waits on the device.
`write_report` stores per-class IoU and mIoU (19 classes, plus 16 and 13 for a SYNTHIA
source, docs/method.md §1) of the student and the EMA teacher, with the settings they
were made with, in `DIR/eval/STEP.json` (`STEP_TAG.json` for `--mode=eval` with other
settings than the training run's, `report_name`), and draws PNGs: image | ground truth |
prediction panels and a row-normalised confusion matrix.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wsda_jax import augment, classes, metrics, parallel

TITLES = ("image", "ground truth", "prediction")


def _resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of [B, H, W, K] without antialiasing (as torch's interpolate)."""
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(
        x, (x.shape[0], height, width, x.shape[3]), method="bilinear", antialias=False
    )


def predict(
    variables: dict[str, Any],
    images: jax.Array,
    *,
    model: nn.Module,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> jax.Array:
    """Eval-mode logits, averaged over scales (and horizontal flips) at full size.

    Args:
      variables: {'params', 'batch_stats'} of the student or the teacher.
      images: uint8 [B, H, W, 3].
      model: the DeepLabV2.
      scales: input scales; each prediction is resized back to (H, W) before averaging.
      flip: also average the prediction of the horizontally flipped image.
    Returns:
      float32 [B, H, W, C] averaged logits.
    """
    x = augment.normalize(images)
    _, height, width, _ = x.shape
    total, count = 0.0, 0
    for scale in scales:
        scaled = _resize(x, round(height * scale), round(width * scale))
        flips = (False, True) if flip else (False,)
        for flipped in flips:
            inputs = scaled[:, :, ::-1] if flipped else scaled
            logits = model.apply(variables, inputs, train=False).logits
            logits = logits[:, :, ::-1] if flipped else logits
            total = total + _resize(logits.astype(jnp.float32), height, width)
            count += 1
    return total / count


def eval_step(
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    num_classes: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    images_per_forward: int = 0,
    axis_name: str = "data",
) -> jax.Array:
    """Confusion matrix int32 [C, C] (rows = ground truth) of the batch, psum-ed over devices.

    batch: {'image': uint8 [B, H, W, 3], 'label': int32 [B, H, W], 'mask': bool [B]};
    masked-out (padding) images count nothing. With 0 < images_per_forward < B the
    forward runs on chunks of that many images in sequence (`lax.map`): the same
    result, with the full-resolution logits of only one chunk alive at a time, and a
    chunk of padding only is skipped (`lax.cond`), so the padded last batch of a split
    costs only its real images.
    """

    def confusion_of(images, labels, mask):
        logits = predict(variables, images, model=model, scales=scales, flip=flip)
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return metrics.batch_confusion_matrix(
            pred, labels.astype(jnp.int32), num_classes, mask=mask
        )

    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    chunk = images_per_forward
    if 0 < chunk < images.shape[0]:
        if images.shape[0] % chunk:
            raise ValueError(
                f"images_per_forward={chunk} does not divide the batch {images.shape[0]}"
            )
        split = lambda x: x.reshape(images.shape[0] // chunk, chunk, *x.shape[1:])
        # Varying over the devices like the computed branch (shard_map's check_vma).
        empty = jax.lax.pcast(
            jnp.zeros((num_classes, num_classes), jnp.int32), (axis_name,), to="varying"
        )
        per_chunk = jax.lax.map(
            lambda xs: jax.lax.cond(jnp.any(xs[2]), confusion_of, lambda *_: empty, *xs),
            (split(images), split(labels), split(mask)),
        )
        confusion = jnp.sum(per_chunk, axis=0)
    else:
        confusion = confusion_of(images, labels, mask)
    return jax.lax.psum(confusion, axis_name)


def make_eval_fn(
    config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh
) -> Callable[[Any, Any], jax.Array]:
    """The jitted, sharded eval step: (variables, batch) -> confusion int32 [C, C]."""
    return parallel.shard_eval_step(
        eval_step,
        mesh,
        model=model,
        num_classes=config.num_classes,
        scales=tuple(config.eval.scales),
        flip=config.eval.flip,
        images_per_forward=config.eval.images_per_forward,
    )


def class_subsets(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """The class sets an mIoU is reported over: all, and SYNTHIA's 16 and 13."""
    subsets = {"miou": tuple(range(config.num_classes))}
    if config.data.source.startswith("synthia"):
        subsets["miou_16"] = classes.SYNTHIA_16
        subsets["miou_13"] = classes.SYNTHIA_13
    return subsets


def evaluate(
    config: ml_collections.ConfigDict,
    models: Mapping[str, Mapping[str, Any]],
    eval_iterator: Iterable[Mapping[str, np.ndarray]],
    *,
    model: Any,
    mesh: jax.sharding.Mesh,
    eval_fn: Callable[[Any, Any], jax.Array] | None = None,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """One pass over `eval_iterator` that evaluates every model on each batch.

    `models` maps a name ('student', 'teacher') to its variables ({'params',
    'batch_stats'} on mesh). Each batch is decoded and copied to the devices once, however
    many models read it. Returns each model's dataset-level confusion matrix, int64
    [C, C] (rows ground truth, columns prediction), and up to `config.eval.num_panels`
    unpadded host examples ({'image', 'label'}) for panels.
    """
    if eval_fn is None:
        eval_fn = make_eval_fn(config, model, mesh)
    per_batch = {name: [] for name in models}
    examples = []
    for batch in eval_iterator:
        for i in np.flatnonzero(batch["mask"])[: config.eval.num_panels - len(examples)]:
            examples.append({"image": batch["image"][i], "label": batch["label"][i]})
        device_batch = parallel.put_batch(dict(batch), mesh)
        for name, variables in models.items():
            per_batch[name].append(eval_fn(variables, device_batch))
    confusions = {}
    for name, matrices in per_batch.items():  # Fetched only after every batch is dispatched.
        confusion = np.zeros((config.num_classes, config.num_classes), np.int64)
        for matrix in matrices:
            confusion += np.asarray(jax.device_get(matrix.addressable_data(0)), np.int64)
        confusions[name] = confusion
    return confusions, examples


def summarize(config: ml_collections.ConfigDict, confusion: np.ndarray) -> dict[str, Any]:
    """mIoU over each class subset and IoU per class name (None where undefined)."""
    per_class = metrics.iou(confusion)
    summary = {
        name: _finite_or_none(metrics.mean_iou(confusion, subset))
        for name, subset in class_subsets(config).items()
    }
    summary["iou"] = {
        classes.CLASS_NAMES[c]: _finite_or_none(per_class[c]) for c in range(config.num_classes)
    }
    summary["pixels"] = int(confusion.sum())
    return summary


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def local_variables(variables: Any) -> Any:
    """This process's first copy of replicated variables (no host transfer)."""
    return jax.tree.map(lambda x: x.addressable_data(0), variables)


@functools.partial(jax.jit, static_argnames=("model", "scales", "flip"))
def _predict_labels(variables, images, *, model, scales, flip):
    logits = predict(variables, images, model=model, scales=scales, flip=flip)
    return logits.argmax(axis=-1).astype(np.uint8)


def predict_labels(
    config: ml_collections.ConfigDict, variables: Any, images: np.ndarray, *, model: Any
) -> np.ndarray:
    """uint8 [B, H, W, 3] images -> uint8 [B, H, W] train ids, on one local device."""
    labels = _predict_labels(
        local_variables(variables),
        images,
        model=model,
        scales=tuple(config.eval.scales),
        flip=config.eval.flip,
    )
    return np.asarray(labels)


# The settings that change an evaluation's numbers; a report made with other values
# than the training run's gets its own file name (`report_name`).
RESULT_SETTINGS = ("target", "split", "scales", "flip", "eval_resize", "max_images", "dtype")


def eval_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every setting an evaluation is made with, JSON-ready (stored in its report)."""
    return {
        "target": config.data.target,
        "split": "val",
        "scales": [float(s) for s in config.eval.scales],
        "flip": bool(config.eval.flip),
        "eval_resize": [int(n) for n in config.data.eval_resize],
        "max_images": int(config.eval.max_images),
        "dtype": config.compute_dtype,
        "num_classes": int(config.num_classes),
        "ignore_label": classes.IGNORE_LABEL,
        "per_device_batch_size": int(config.eval.per_device_batch_size),
        "images_per_forward": int(config.eval.images_per_forward),
    }


def report_name(settings: Mapping[str, Any], trained: Mapping[str, Any] | None, step: int) -> str:
    """`STEP` when the result settings equal the training run's (`trained`, None = this
    is the training run), else `STEP_` + a tag of the settings, e.g.
    '0_scales0.5-1-2_flip' (so `--mode=eval` with other settings keeps its own files)."""
    if trained is None or all(settings[k] == trained.get(k) for k in RESULT_SETTINGS):
        return str(step)
    parts = ["scales" + "-".join(f"{s:g}" for s in settings["scales"])]
    if settings["flip"]:
        parts.append("flip")
    if settings["eval_resize"]:
        parts.append("resize{}x{}".format(*settings["eval_resize"]))
    if settings["max_images"]:
        parts.append(f"first{settings['max_images']}")
    parts.append(settings["dtype"])
    if settings["target"] != trained.get("target"):
        parts.append(settings["target"].replace("/", "-"))
    return f"{step}_" + "_".join(parts)


def write_report(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int,
    results: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    examples: list[dict[str, np.ndarray]],
    *,
    name: str | None = None,
) -> dict[str, Any]:
    """Writes DIR/eval/NAME.json (NAME = `name`, default STEP) and PNGs; returns the JSON
    content, which includes `eval_settings(config)`.

    `results` maps a model name ('student', 'teacher') to its confusion matrix and its
    predictions for `examples` (or None).
    """
    name = str(step) if name is None else name
    report = {"step": step, "settings": eval_settings(config)}
    report.update(
        {model: summarize(config, confusion) for model, (confusion, _) in results.items()}
    )
    if jax.process_index() != 0:
        return report
    directory = os.path.join(workdir, "eval")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(f"{path}.tmp", path)  # A kill mid-write leaves the old report whole.
    for model, (confusion, predictions) in results.items():
        plot_confusion(confusion, os.path.join(directory, f"{name}_{model}_confusion.png"))
        if predictions is not None and examples:
            plot_panels(
                examples, predictions, os.path.join(directory, f"{name}_{model}_panels.png")
            )
    return report


def _figure(**kwargs):
    """A matplotlib Figure drawn off-screen (Agg), outside pyplot's global figure list;
    matplotlib is imported here, by the processes that draw (about 0.5 s)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def plot_panels(examples: list[dict[str, np.ndarray]], predictions: np.ndarray, path: str) -> None:
    """One row per example: image | ground truth | prediction (class palette)."""
    figure = _figure(figsize=(9, 2.2 * len(examples)))
    axes = figure.subplots(len(examples), 3, squeeze=False)
    for row, (example, prediction) in enumerate(zip(examples, predictions, strict=True)):
        panels = (
            example["image"],
            classes.colorize(example["label"]),
            classes.colorize(prediction),
        )
        for col, (panel, title) in enumerate(zip(panels, TITLES, strict=True)):
            axes[row, col].imshow(panel)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def plot_confusion(confusion: np.ndarray, path: str) -> None:
    """Confusion matrix normalised per ground-truth row, with class names."""
    totals = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    names = classes.CLASS_NAMES[: confusion.shape[0]]
    figure = _figure(figsize=(8, 7))
    axis = figure.subplots()
    image = axis.imshow(normalised, vmin=0.0, vmax=1.0, cmap="Blues")
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axis.set_yticks(range(len(names)), names, fontsize=7)
    axis.set_xlabel("prediction")
    axis.set_ylabel("ground truth")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
