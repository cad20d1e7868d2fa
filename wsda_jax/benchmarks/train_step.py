"""Times the full adaptation train step (jit(shard_map(steps.adapt_step))) on the devices.

    python -m wsda_jax.benchmarks.train_step --depth=101 --crop=256 --batch=1 --dtype=float32

What is timed: one call of the compiled step on a random batch of `--batch` source plus
`--batch` target images (global, split over all devices), including the teacher EMA,
four network passes (teacher, student on target, source and the ClassMix batch), three
backward passes, prototypes, the three sampled contrastive losses and the SGD update.
Reported: trace+lower time, XLA compile time, the median of `--steps` calls after one
warm-up call, images/s (source + target images per second), and the FLOP rate from
XLA's cost analysis of the compiled program (per device program, times the devices).
Prints a markdown table row.
"""

from __future__ import annotations

from wsda_jax import cpu_flags

cpu_flags.apply_cpu_defaults()  # Before JAX initialises its backend.

import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from wsda_jax import config_lib, optim, parallel, steps, train_state  # noqa: E402
from wsda_jax.models import deeplab  # noqa: E402

_DEPTH = flags.DEFINE_integer("depth", 101, "ResNet depth (18, 34, 50, 101).")
_WIDTH = flags.DEFINE_integer("width", 64, "Stem width.")
_CROP = flags.DEFINE_integer("crop", 256, "Square crop size in pixels.")
_BATCH = flags.DEFINE_integer("batch", 1, "Global images per domain per step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_WEAK = flags.DEFINE_enum("weak_label", "coarse", ["none", "image", "point", "coarse"], "Kind.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up step.")


def make_config(depth: int, width: int, crop: int, batch: int, dtype: str, weak_label: str):
    """The base configuration at the benchmark's size (all loss terms active)."""
    config = config_lib.base_config()
    config.model.depth = depth
    config.model.width = width
    config.data.crop_size = (crop, crop)
    config.per_device_batch_size = batch
    config.compute_dtype = dtype
    config.weak_label = weak_label
    config.loss.contrast_start = 0
    return config


def random_batch(config, seed: int = 0) -> dict:
    """A numpy train batch of the configured shape with random images and labels."""
    rng = np.random.default_rng(seed)
    batch, (height, width), classes = (
        config.per_device_batch_size,
        config.data.crop_size,
        config.num_classes,
    )
    shape = (batch, height, width)

    def labels():
        coarse = rng.integers(0, classes, (batch, height // 32, width // 32))
        return np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2).astype(np.int32)

    target_label = labels()
    weak = np.where(rng.random(shape) < 0.5, target_label, 255).astype(np.int32)
    presence = np.zeros((batch, classes), np.float32)
    for b in range(batch):
        presence[b, np.unique(target_label[b])] = 1.0
    return {
        "source": {"image": rng.integers(0, 256, (*shape, 3), np.uint8), "label": labels()},
        "target": {
            "image": rng.integers(0, 256, (*shape, 3), np.uint8),
            "weak_label": weak,
            "presence": presence,
            "label": target_label,
        },
    }


def _host_random(tree, seed: int = 0):
    """Fills a tree of ShapeDtypeStructs: He-scaled normal kernels, unit scales/variances."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


def random_state(config, model, optimizer) -> train_state.TrainState:
    """A TrainState with host-random weights (compiling model.init for ResNet-101 is slow)."""
    size = config.data.crop_size[0]
    abstract = train_state.abstract_train_state(config, model, (1, size, size, 3), optimizer)
    params = _host_random(abstract.params)
    batch_stats = _host_random(abstract.batch_stats)
    prototypes = jnp.zeros((config.num_classes, config.model.proj_dim), jnp.float32)
    return train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=jax.jit(optimizer.init)(params),
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        source_prototypes=prototypes,
        target_prototypes=jnp.copy(prototypes),  # Distinct buffers: the state is donated.
        rng=jax.random.PRNGKey(0),
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def flops_of(compiled) -> float | None:
    """FLOPs of one call from XLA's cost analysis, None where the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # Not every backend implements it.
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def run(config, num_steps: int) -> dict:
    """Compiles and times the adapt step; returns the measurements."""
    mesh = parallel.make_mesh()
    model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
    optimizer = optim.make_optimizer(config)
    state = parallel.replicate(random_state(config, model, optimizer), mesh)
    batch = parallel.put_batch(random_batch(config), mesh)
    step = parallel.shard_train_step(
        steps.adapt_step, mesh, model=model, optimizer=optimizer, config=config
    )
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # Warm-up.
    jax.block_until_ready(metrics)
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = flops_of(compiled)
    if flops is not None:
        flops *= mesh.size  # The cost analysis is of one device's program.
    return {
        "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "lower_s": lower_s,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": 2 * config.per_device_batch_size / step_s,
        "gflop_per_step": None if flops is None else flops / 1e9,
        "gflop_per_s": None if flops is None else flops / 1e9 / step_s,
        "total_loss": float(metrics["total"]),
    }


def main(argv: Sequence[str]) -> None:
    del argv
    config = make_config(
        _DEPTH.value, _WIDTH.value, _CROP.value, _BATCH.value, _DTYPE.value, _WEAK.value
    )
    result = run(config, _STEPS.value)
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"
    print(
        "| device | model | crop | images (src+tgt) | dtype | lower s | compile s | step s "
        "| images/s | GFLOP/step | GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {result['device']} | ResNet-{_DEPTH.value} w{_WIDTH.value} | {_CROP.value} "
        f"| {_BATCH.value}+{_BATCH.value} | {_DTYPE.value} | {result['lower_s']:.1f} "
        f"| {result['compile_s']:.1f} | {result['step_s']:.2f} | {result['images_per_s']:.2f} "
        f"| {fmt(result['gflop_per_step'])} | {fmt(result['gflop_per_s'])} |"
    )


if __name__ == "__main__":
    app.run(main)
