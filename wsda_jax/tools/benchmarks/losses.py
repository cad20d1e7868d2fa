"""Speed of the prototype updates, sampled contrastive losses and image-level losses.

    python -m wsda_jax.tools.benchmarks.losses --runs=10

At the reference's shapes (4 source + 4 target images, 512x512 labels, 64x64x256
features, 19 classes, `coarse` weak labels) times, jitted, on whatever device JAX
sees: the two prototype updates, the three contrastive losses with sampling
(`inter` with 512 samples on the 8 concatenated images, the two intra losses with
256), the two image-level losses, all of them together forward, and forward +
backward (gradient w.r.t. the student features and the target logits). Prints a
markdown table of medians (and minima: the CPU may be shared) and the speed-up over
the PyTorch reference (REFERENCE_* below); the last two rows leave out `im_u`, the
image-level loss on the full-resolution 512x512x19 logits, whose 80 MB pass dominates
on a CPU, and have no reference. The model's
own cost is `wsda_jax.tools.benchmarks.model`. Not a test: numbers depend on the host's
free cores.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from wsda_jax import (
    cli_errors,
    config_lib,
    contrastive,
    label_ops,
    losses,
    prototypes,
    pseudo_labels,
)
from wsda_jax.models import deeplab

BATCH, SIZE, FEATURE_SIZE, DIM, C = 4, 512, 64, 256, 19
# The reference's own prototype, contrastive and image-level loss code on inputs made by
# this file's recipe (4 + 4 images, 64-px block labels over all 19 classes, coarse weak
# labels on half the image, unit-norm 64x64x256 features), torch 2.14.1 on the 2-core
# CPU machine (2 threads): medians of two quiet runs of 5, (low, high) seconds.
REFERENCE_FORWARD_S = (0.274, 0.315)
REFERENCE_BACKWARD_S = (2.67, 2.67)


def _block_labels(rng: np.random.Generator, block: int) -> np.ndarray:
    """`[B, 512, 512]` int32 labels of random classes on `block`-pixel squares."""
    cells = rng.integers(0, C, size=(BATCH, SIZE // block, SIZE // block))
    return np.repeat(np.repeat(cells, block, axis=1), block, axis=2).astype(np.int32)


def make_inputs(seed: int = 0) -> dict[str, jax.Array]:
    """Random tensors of the reference's shapes (features unit-norm, blocky labels)."""
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), 8)

    def unit(key):
        x = jax.random.normal(key, (BATCH, FEATURE_SIZE, FEATURE_SIZE, DIM))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    source_label = _block_labels(rng, 64)
    # Source-like low-res logits: mostly right, so both hard and easy pixels exist.
    low_truth = label_ops.resize_nearest(source_label, (FEATURE_SIZE, FEATURE_SIZE))
    weak = _block_labels(rng, 64)
    weak[:, (np.arange(SIZE) // 64) % 2 == 1] = 255  # coarse: half the image unlabelled
    lowres = lambda key, truth: (
        6.0 * jax.nn.one_hot(truth, C)
        + 2.0 * jax.random.normal(key, (BATCH, FEATURE_SIZE, FEATURE_SIZE, C))
    )
    weak_low = label_ops.resize_nearest(jnp.where(weak == 255, 0, weak), (FEATURE_SIZE,) * 2)
    presence = np.zeros((BATCH, C), np.float32)
    for b in range(BATCH):
        presence[b, np.unique(weak[b][weak[b] != 255])] = 1.0
    return {
        "features_s": unit(keys[0]),
        "features_u": unit(keys[1]),
        "teacher_features": unit(keys[2]),
        "lowres_s": lowres(keys[3], low_truth),
        "lowres_u": lowres(keys[4], weak_low),
        "teacher_lowres": lowres(keys[5], weak_low),
        "logits_u": jax.random.normal(keys[6], (BATCH, SIZE, SIZE, C)),
        "source_label": jnp.asarray(source_label),
        "weak_label": jnp.asarray(weak),
        "presence": jnp.asarray(presence),
        "target_protos": unit(keys[7])[0, 0, :C],
        "source_protos": unit(keys[7])[0, 1, :C],
        "key": jax.random.key(seed + 1),
    }


def _config():
    """The reference's loss settings with `coarse` weak labels."""
    config = config_lib.base_config()
    config.weak_label = "coarse"
    config.num_classes = C
    return config


def _outputs(x: dict, domain: str) -> deeplab.SegmentationOutput:
    """Student ('s', 'u') or teacher outputs; the full-res logits are unused here."""
    if domain == "teacher":
        features, lowres = x["teacher_features"], x["teacher_lowres"]
    else:
        features, lowres = x[f"features_{domain}"], x[f"lowres_{domain}"]
    return deeplab.SegmentationOutput(features=features, lowres_logits=lowres, logits=x["logits_u"])


def _teacher(x: dict) -> pseudo_labels.PseudoLabels:
    """The teacher's pseudo labels, exactly as the adaptation step derives them."""
    teacher = jax.lax.stop_gradient(_outputs(x, "teacher"))
    return pseudo_labels.pseudo_labels(
        teacher, x["weak_label"], x["presence"], _config(), axis_name=None
    )


def target_prototypes(x: dict) -> jax.Array:
    teacher = _teacher(x)
    return prototypes.update_target_prototypes(
        x["target_protos"],
        teacher.features,
        teacher.masked_lowres,
        x["weak_label"],
        weak_label_kind=_config().weak_label,
    )


def source_prototypes(x: dict) -> jax.Array:
    return prototypes.update_source_prototypes(
        x["source_protos"], x["features_s"], x["source_label"]
    )


def contrastive_losses(x: dict, source_protos=None, target_protos=None) -> dict[str, jax.Array]:
    """The step's three contrastive losses (unweighted), given or stored prototypes."""
    names = ("inter", "intra_src", "intra_tgt")
    keys = dict(zip(names, jax.random.split(x["key"], len(names)), strict=True))
    teacher = _teacher(x)
    loss_values, _ = contrastive.contrastive_losses(
        keys,
        _outputs(x, "s"),
        _outputs(x, "u"),
        x["source_label"],
        x["weak_label"],
        teacher.features,
        teacher.masked_lowres,
        teacher.lowres_confidence,
        x["source_protos"] if source_protos is None else source_protos,
        x["target_protos"] if target_protos is None else target_protos,
        _config(),
    )
    return loss_values


def image_losses(x: dict, protos: jax.Array | None = None) -> jax.Array:
    protos = x["target_protos"] if protos is None else protos
    return losses.image_level_loss(x["logits_u"], x["presence"]) + losses.prototype_image_loss(
        x["features_u"], protos, x["presence"]
    )


def all_losses(x: dict, *, full_res_image_loss: bool = True) -> jax.Array:
    """Prototype updates, then the weighted contrastive and image-level losses (method §4.11)."""
    tgt = target_prototypes(x)
    weights = _config().loss
    contrast = contrastive_losses(x, source_prototypes(x), tgt)
    total = sum(weights[name] * loss for name, loss in contrast.items())
    if full_res_image_loss:
        return total + image_losses(x, tgt)
    return total + losses.prototype_image_loss(x["features_u"], tgt, x["presence"])


def all_losses_grad(x: dict, *, full_res_image_loss: bool = True) -> dict:
    """Gradient of `all_losses` w.r.t. the student features (and the target logits)."""
    names = ("features_s", "features_u") + (("logits_u",) if full_res_image_loss else ())

    def fn(diff):
        return all_losses({**x, **diff}, full_res_image_loss=full_res_image_loss)

    return jax.grad(fn)({k: x[k] for k in names})


def _one_loss(name: str) -> Callable[[dict], jax.Array]:
    """One contrastive loss alone: jit drops the other two from the computation."""
    return lambda x: contrastive_losses(x)[name]


def time_seconds(fn: Callable, x: dict, runs: int) -> tuple[float, float]:
    """(median, min) wall time of `runs` calls after one compiling call.

    The minimum is printed too because the CPU may be shared and medians are noisy.
    """
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


_RUNS = flags.DEFINE_integer("runs", 10, "Timed calls per computation (after one compiling call).")


def main(argv: Sequence[str]) -> None:
    del argv
    runs = _RUNS.value
    if runs < 1:
        raise app.UsageError(f"--runs={runs} must be positive")

    x = make_inputs()
    cases = [
        ("target prototype update", target_prototypes, None),
        ("source prototype update", source_prototypes, None),
        ("inter contrastive (8 images, 512 samples)", _one_loss("inter"), None),
        ("intra_src contrastive (256 samples)", _one_loss("intra_src"), None),
        ("intra_tgt contrastive (256 samples)", _one_loss("intra_tgt"), None),
        ("image-level losses (im_u + im_proto)", image_losses, None),
        ("all of the above, forward", all_losses, REFERENCE_FORWARD_S),
        ("all of the above, forward + backward", all_losses_grad, REFERENCE_BACKWARD_S),
        (
            "all without the full-res im_u, forward",
            functools.partial(all_losses, full_res_image_loss=False),
            None,
        ),
        (
            "all without the full-res im_u, forward + backward",
            functools.partial(all_losses_grad, full_res_image_loss=False),
            None,
        ),
    ]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), runs: {runs}\n")
    print("| computation | median ms | min ms | PyTorch reference ms | speed-up (median) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, fn, reference in cases:
        median, fastest = time_seconds(jax.jit(fn), x, runs)
        ref_ms = speedup = ""
        if reference:
            ref_ms = "-".join(dict.fromkeys(f"{r * 1e3:.0f}" for r in reference))
            speedup = "-".join(dict.fromkeys(f"{r / median:.1f}" for r in reference)) + "x"
        print(
            f"| {name} | {median * 1e3:.1f} | {fastest * 1e3:.1f} | {ref_ms} | {speedup} |",
            flush=True,
        )


if __name__ == "__main__":
    cli_errors.run_tool(main)
