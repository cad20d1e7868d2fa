"""Speed of the prototype updates, sampled contrastive losses and image-level losses.

    python -m wsda_jax.benchmarks.losses [--runs 10] [--no-model]

At the reference's shapes (4 source + 4 target images, 512x512 labels, 64x64x256
features, 19 classes, `coarse` weak labels) times, jitted, on whatever device JAX
sees: the two prototype updates, the three contrastive losses with sampling
(`inter` with 512 samples on the 8 concatenated images, the two intra losses with
256), the two image-level losses, all of them together forward, and forward +
backward (gradient w.r.t. the student features and the target logits). Prints a
markdown table of medians (and minima: the CPU may be shared) and the speed-up over
the PyTorch reference measured on the 2-core CPU machine (179 ms forward, 1.33 s
forward + backward); the last two rows leave out `im_u`, the image-level loss on the
full-resolution 512x512x19 logits, whose 80 MB pass dominates on a CPU. With `--model`
(default on) also prints `wsda_jax.benchmarks.model.benchmark_rows()` when that
module exists. Not a test: numbers depend on the host's free cores.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from wsda_jax import label_ops, losses, prototypes

BATCH, SIZE, FEATURE_SIZE, DIM, C = 4, 512, 64, 256, 19
REFERENCE_FORWARD_S, REFERENCE_BACKWARD_S = 0.179, 1.33
MAX_VIEWS, TEMPERATURE, BASE_TEMPERATURE = 20, 0.1, 0.07


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
    weak[:, ::2] = 255  # coarse: much of the image unlabelled
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


def _prediction(lowres_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    prob = jax.nn.softmax(lowres_logits, axis=-1)
    return jnp.argmax(prob, axis=-1).astype(jnp.int32), jnp.max(prob, axis=-1)


def _labels(x: dict) -> dict:
    """Label maps at feature resolution, as the adaptation step builds them (M s. 5, 7, 8)."""
    src_pred, src_prob = _prediction(x["lowres_s"])
    teacher_pred, teacher_prob = _prediction(jax.lax.stop_gradient(x["teacher_lowres"]))
    masked = jnp.where(teacher_prob < 0.95, 255, teacher_pred)
    u_pred, u_prob = _prediction(x["lowres_u"])
    feature_size = (FEATURE_SIZE, FEATURE_SIZE)
    return {
        "src_pred": src_pred,
        "src_prob": src_prob,
        "src_label": label_ops.fuse(src_pred, x["source_label"]),
        "src_low": label_ops.resize_nearest(x["source_label"], feature_size),
        "masked": masked,
        "teacher_prob": teacher_prob,
        "tgt_label": label_ops.fuse(masked, x["weak_label"]),
        "weak_low": label_ops.resize_nearest(x["weak_label"], feature_size),
        "u_pred": u_pred,
        "u_prob": u_prob,
        "u_label": label_ops.fuse(u_pred, x["weak_label"]),
    }


def target_prototypes(x: dict) -> jax.Array:
    lab = _labels(x)
    return prototypes.update_prototypes(
        x["target_protos"], x["teacher_features"], lab["weak_low"], lab["tgt_label"]
    )


def source_prototypes(x: dict) -> jax.Array:
    lab = _labels(x)
    return prototypes.update_prototypes(
        x["source_protos"], x["features_s"], lab["src_low"], lab["src_low"]
    )


_contrastive = functools.partial(
    losses.sampled_contrastive_loss,
    max_views=MAX_VIEWS,
    temperature=TEMPERATURE,
    base_temperature=BASE_TEMPERATURE,
)


def inter_loss(x: dict, protos: jax.Array | None = None) -> jax.Array:
    lab = _labels(x)
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)
    domain = jnp.concatenate([jnp.zeros(BATCH, jnp.int32), jnp.ones(BATCH, jnp.int32)])
    loss, _ = _contrastive(
        jax.random.fold_in(x["key"], 0),
        cat(x["features_s"], jax.lax.stop_gradient(x["teacher_features"])),
        cat(lab["src_label"], lab["tgt_label"]),
        cat(lab["src_pred"], lab["masked"]),
        cat(lab["src_prob"], lab["teacher_prob"]),
        domain,
        x["target_protos"] if protos is None else protos,
        max_samples=512,
        easy_threshold=0.95,
        cross_domain=True,
    )
    return loss


def intra_src_loss(x: dict, protos: jax.Array | None = None) -> jax.Array:
    lab = _labels(x)
    loss, _ = _contrastive(
        jax.random.fold_in(x["key"], 1),
        x["features_s"],
        lab["src_label"],
        lab["src_pred"],
        lab["src_prob"],
        jnp.zeros(BATCH, jnp.int32),
        x["source_protos"] if protos is None else protos,
        max_samples=256,
        easy_threshold=0.96,
        cross_domain=False,
    )
    return loss


def intra_tgt_loss(x: dict, protos: jax.Array | None = None) -> jax.Array:
    lab = _labels(x)
    loss, _ = _contrastive(
        jax.random.fold_in(x["key"], 2),
        x["features_u"],
        lab["u_label"],
        lab["u_pred"],
        lab["u_prob"],
        jnp.ones(BATCH, jnp.int32),
        x["target_protos"] if protos is None else protos,
        max_samples=256,
        easy_threshold=0.96,
        cross_domain=False,
    )
    return loss


def image_losses(x: dict, protos: jax.Array | None = None) -> jax.Array:
    protos = x["target_protos"] if protos is None else protos
    proto_logits = jnp.einsum("bhwd,cd->bhwc", x["features_u"], jax.lax.stop_gradient(protos))
    return losses.image_level_loss(x["logits_u"], x["presence"]) + losses.image_level_loss(
        proto_logits, x["presence"]
    )


def all_losses(x: dict, *, full_res_image_loss: bool = True) -> jax.Array:
    """Prototype updates, then the weighted contrastive and image-level losses (M s. 4.11)."""
    tgt = target_prototypes(x)
    src = source_prototypes(x)
    contrast = 0.5 * inter_loss(x, tgt) + 0.25 * intra_tgt_loss(x, tgt)
    contrast += 0.25 * intra_src_loss(x, src)
    if full_res_image_loss:
        return contrast + image_losses(x, tgt)
    proto_logits = jnp.einsum("bhwd,cd->bhwc", x["features_u"], tgt)
    return contrast + losses.image_level_loss(proto_logits, x["presence"])


def all_losses_grad(x: dict, *, full_res_image_loss: bool = True) -> dict:
    """Gradient of `all_losses` w.r.t. the student features (and the target logits)."""
    names = ("features_s", "features_u") + (("logits_u",) if full_res_image_loss else ())

    def fn(diff):
        return all_losses({**x, **diff}, full_res_image_loss=full_res_image_loss)

    return jax.grad(fn)({k: x[k] for k in names})


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


def model_rows() -> list:
    """Rows of `wsda_jax.benchmarks.model.benchmark_rows()`, or [] if that module is absent."""
    try:
        module = importlib.import_module("wsda_jax.benchmarks.model")
    except ModuleNotFoundError:
        return []
    return list(module.benchmark_rows()) if hasattr(module, "benchmark_rows") else []


def _print_rows(rows: list) -> None:
    """Prints rows (dicts with shared keys, or tuples) as a markdown table."""
    if isinstance(rows[0], dict):
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + " --- |" * len(keys))
        rows = [[row.get(k) for k in keys] for row in rows]
    for row in rows:
        cells = row if isinstance(row, (tuple, list)) else [row]
        print("| " + " | ".join("" if v is None else str(v) for v in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.runs < 1:
        raise ValueError(f"--runs={args.runs} must be positive")

    x = make_inputs()
    cases = [
        ("target prototype update", target_prototypes, None),
        ("source prototype update", source_prototypes, None),
        ("inter contrastive (8 images, 512 samples)", inter_loss, None),
        ("intra_src contrastive (256 samples)", intra_src_loss, None),
        ("intra_tgt contrastive (256 samples)", intra_tgt_loss, None),
        ("image-level losses (im_u + im_proto)", image_losses, None),
        ("all of the above, forward", all_losses, REFERENCE_FORWARD_S),
        ("all of the above, forward + backward", all_losses_grad, REFERENCE_BACKWARD_S),
        (
            "all without the full-res im_u, forward",
            functools.partial(all_losses, full_res_image_loss=False),
            REFERENCE_FORWARD_S,
        ),
        (
            "all without the full-res im_u, forward + backward",
            functools.partial(all_losses_grad, full_res_image_loss=False),
            REFERENCE_BACKWARD_S,
        ),
    ]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), runs: {args.runs}\n")
    print("| computation | median ms | min ms | PyTorch reference ms | speed-up (median) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, fn, reference in cases:
        median, fastest = time_seconds(jax.jit(fn), x, args.runs)
        ref_ms = f"{reference * 1e3:.0f}" if reference else ""
        speedup = f"{reference / median:.1f}x" if reference else ""
        print(
            f"| {name} | {median * 1e3:.1f} | {fastest * 1e3:.1f} | {ref_ms} | {speedup} |",
            flush=True,
        )

    if args.model:
        rows = model_rows()
        if rows:
            print("\nModel (wsda_jax.benchmarks.model):\n")
            _print_rows(rows)


if __name__ == "__main__":
    main()
