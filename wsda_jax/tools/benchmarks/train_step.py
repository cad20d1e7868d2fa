"""Times, or only compiles, the full adaptation train step (jit(shard_map(steps.adapt_step))).

    python -m wsda_jax.tools.benchmarks.train_step --depth=101 --crop=256 --images_per_device=1
    python -m wsda_jax.tools.benchmarks.train_step --depth=101 --crop=512 --images_per_device=4 \
        --dtype=bfloat16 --remat=blocks --compile_only
    python -m wsda_jax.tools.benchmarks.train_step --crop=512 --images_per_device=1 \
        --simulated_devices=4 --compile_only
    python -m wsda_jax.tools.benchmarks.train_step --crop=512 --images_per_device=4 \
        --dtype=bfloat16 --target=h100 --compile_only      # needs requirements-aot.txt

What is timed: one call of the compiled step on a random batch of `--images_per_device`
source plus as many target images on every device, including the teacher EMA, four
network passes (teacher, student on target, source and the ClassMix batch), three
backward passes, prototypes, the three sampled contrastive losses and the SGD update
(`--before_contrast_start`: the step before `loss.contrast_start`, without the
contrastive and image-level losses). Reported: trace+lower time, XLA compile time, the
median of `--steps` calls after one warm-up call, images/s (source + target images per
second), and the FLOP rate from XLA's cost analysis of the compiled program (per device
program, times the devices). Prints a markdown table row.

`--compile_only` lowers the step on abstract inputs (no weights are made, nothing runs)
and prints XLA's `memory_analysis()` of one device's program: argument, output, aliased
(the donated state) and temporary bytes, their sum `peak_memory_gb` = arguments +
outputs - aliased + temporaries on its own line (everything live at once: an upper bound
of what the device must hold), and the FLOPs of
`cost_analysis()`. The analysis is of the program XLA compiled for THIS backend: the
CPU's buffer assignment and fusion differ from a GPU's or a TPU's, so on the CPU it
estimates the accelerator's number (see docs/accelerators.md).

`--target=h100|h200|a100|a100-40gb|tpu-v4-8|tpu-v5e-8|tpu-v5p-8` (with `--compile_only`)
compiles instead for that accelerator with its own XLA compiler, without one
(`wsda_jax.aot`, docs/aot.md): the same memory lines for one device of the target, its
memory and the fit verdict, FLOPs and bytes, facts of the compiled HLO and a roofline
estimate of the step time. `--json_out=PATH` also writes them as JSON.
"""

from __future__ import annotations

from wsda_jax import cli_errors, cpu_flags, gpu_flags

cpu_flags.apply_cpu_defaults()  # Before JAX initialises its backend.
gpu_flags.apply_gpu_defaults()  # On a GPU host; --target=<a GPU> adds them in main().

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from wsda_jax import (  # noqa: E402
    aot,
    config_lib,
    config_model,
    config_presets,
    optim,
    parallel,
    steps,
    train_state,
)
from wsda_jax.aot import memory_of  # noqa: E402
from wsda_jax.aot_targets import TARGETS  # noqa: E402
from wsda_jax.models import deeplab  # noqa: E402

_DEPTH = flags.DEFINE_integer("depth", 101, "ResNet depth (18, 34, 50, 101).")
_WIDTH = flags.DEFINE_integer("width", 64, "Stem width.")
_CROP = flags.DEFINE_integer("crop", 256, "Square crop size in pixels.")
_IMAGES = flags.DEFINE_integer(
    "images_per_device", 1, "Source images per device per step (and as many target images)."
)
# The name of earlier commands (docs/benchmarks.md), the same on one device.
flags.DEFINE_alias("batch", "images_per_device")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_WEAK = flags.DEFINE_enum("weak_label", "coarse", list(config_lib.WEAK_LABEL_KINDS), "Kind.")
_REMAT = flags.DEFINE_enum(
    "remat", "none", list(config_model.REMAT_MODES["deeplabv2"]), "config.model.remat."
)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up step.")
_BEFORE_CONTRAST = flags.DEFINE_bool(
    "before_contrast_start", False, "Time the step before loss.contrast_start."
)
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Only compile; print the memory and cost analyses."
)
_TARGET = flags.DEFINE_enum(
    "target", None, list(TARGETS), "With --compile_only: compile for this accelerator."
)
_JSON_OUT = flags.DEFINE_string("json_out", None, "With --target: also write the result here.")
_SIMULATED_DEVICES = flags.DEFINE_integer(
    "simulated_devices", 0, "Run on this many simulated CPU devices (0 = the real devices)."
)


def make_config(
    depth: int,
    width: int,
    crop: int,
    images_per_device: int,
    dtype: str,
    weak_label: str,
    remat: str = "none",
):
    """The base configuration at the benchmark's size (all loss terms active from step 0)."""
    config = config_lib.base_config()
    config.model.depth = depth
    config.model.width = width
    config.model.remat = remat
    config.data.crop_size = (crop, crop)
    config_presets.scale_pseudo_margins(config, crop)  # The reference's at 512.
    config.per_device_batch_size = images_per_device
    config.compute_dtype = dtype
    config.weak_label = weak_label
    config.loss.contrast_start = 0
    return config


def global_batch_size(config) -> int:
    """Images per domain in one step, over all devices (the batch size is per device)."""
    return config.per_device_batch_size * jax.device_count()


def random_batch(config, seed: int = 0) -> dict:
    """A numpy train batch of the configured (global) shape with random images and labels."""
    rng = np.random.default_rng(seed)
    batch, (height, width) = global_batch_size(config), config.data.crop_size
    classes = config.num_classes
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
    key = jax.random.PRNGKey(config.seed)
    abstract = train_state.create_train_state(
        config, model, key, optimizer=optimizer, abstract=True
    )
    params = _host_random(abstract.params)
    batch_stats = _host_random(abstract.batch_stats)
    opt_state = jax.jit(optimizer.init)(params)
    return train_state.fresh_state(config, params, batch_stats, opt_state, jax.random.PRNGKey(0))


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


def abstract_batch(config, mesh: jax.sharding.Mesh) -> dict:
    """ShapeDtypeStructs of `random_batch(config)`, sharded P('data') on `mesh`."""
    return parallel.abstract_on(random_batch(config), parallel.split_over_data(mesh))


def abstract_state(config, model, optimizer, mesh: jax.sharding.Mesh) -> train_state.TrainState:
    """ShapeDtypeStructs of the train state, replicated on `mesh`."""
    key = jax.random.PRNGKey(config.seed)
    return train_state.create_train_state(
        config, model, key, optimizer=optimizer, mesh=mesh, abstract=True
    )


def make_step(config, mesh: jax.sharding.Mesh):
    """(model, optimizer, jitted sharded adapt step) for `config` on `mesh`; the step of
    step 0 (without the contrastive and image-level losses if 0 < loss.contrast_start)."""
    model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
    optimizer = optim.make_optimizer(config)
    step = parallel.shard_train_step(
        steps.adapt_step,
        mesh,
        model=model,
        optimizer=optimizer,
        config=config,
        contrast_on=config.loss.contrast_start == 0,
    )
    return model, optimizer, step


def compile_step(step, state, batch) -> tuple[object, float, float]:
    """(compiled step, trace+lower seconds, compile seconds); state/batch may be abstract."""
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lower_s, time.perf_counter() - start


def compile_only(config) -> dict:
    """Compiles the adapt step on abstract inputs; returns timings, memory and FLOPs."""
    mesh = parallel.make_mesh()
    model, optimizer, step = make_step(config, mesh)
    state = abstract_state(config, model, optimizer, mesh)
    compiled, lower_s, compile_s = compile_step(step, state, abstract_batch(config, mesh))
    flops = flops_of(compiled)
    return {
        "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "lower_s": lower_s,
        "compile_s": compile_s,
        "memory": memory_of(compiled),
        "gflop_per_device_step": None if flops is None else flops / 1e9,
    }


def run(config, num_steps: int) -> dict:
    """Compiles and times the adapt step; returns the measurements."""
    mesh = parallel.make_mesh()
    model, optimizer, step = make_step(config, mesh)
    state = parallel.replicate(random_state(config, model, optimizer), mesh)
    batch = parallel.put_batch(random_batch(config), mesh)
    compiled, lower_s, compile_s = compile_step(step, state, batch)
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
        "images_per_s": 2 * global_batch_size(config) / step_s,
        "gflop_per_step": None if flops is None else flops / 1e9,
        "gflop_per_s": None if flops is None else flops / 1e9 / step_s,
        "memory": memory_of(compiled),
        "total_loss": float(metrics["total"]),
    }


def print_target_result(info: dict) -> None:
    """The --target lines: key=value, `peak_memory_gb=` on its own line, the verdict last."""
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
    for name, value in (info["memory_gb"] or {}).items():
        print(f"{name}={value:.2f}")
    if info["memory_gb"] is None:
        print(f"peak_memory_gb={fmt(info['peak_memory_gb'])}  # {info['compiler_error']}")
    for name in ("device_memory_gb", "usable_memory_gb", "lower_s", "compile_s"):
        print(f"{name}={fmt(info[name])}")
    flops, bytes_ = info["flops_per_device_step"], info["bytes_accessed_per_device_step"]
    print(f"gflop_per_device_step={fmt(flops and flops / 1e9)}  # {info['flops_source']}")
    print(f"gbytes_accessed_per_device_step={fmt(bytes_ and bytes_ / 1e9)}")
    print(f"roofline_step_ms_estimate={fmt(info['roofline_step_ms_estimate'])}")
    for name, value in info["hlo"].items():
        print(f"hlo_{name}={json.dumps(value) if isinstance(value, dict) else value}")
    print(info["verdict"])


def compile_for_target(config, target_name: str, json_out: str | None) -> None:
    """--target: compile `config`'s step for the accelerator, print (and write) the result."""
    target = TARGETS[target_name]
    gpu_flags.apply_gpu_defaults(gpu=target.platform == "cuda")  # No backend has started.
    aot.use_cpu_host()
    reason = aot.missing_package(target)
    if reason:
        sys.exit(f"error: {reason}")  # One line on stderr, exit status 1.
    config_lib.validate(config, 1)
    info = aot.summary(aot.compile_for_target(config, target), target, config)
    print(
        f"target={target.name} devices={info['devices']} model={config_model.model_name(config)!r} "
        f"crop={config.data.crop_size[0]} images_per_device={config.per_device_batch_size}+"
        f"{config.per_device_batch_size} dtype={config.compute_dtype} remat={config.model.remat}"
    )
    print_target_result(info)
    if json_out:
        with open(json_out, "w") as file:
            json.dump(info, file, indent=1)


def main(argv: Sequence[str]) -> None:
    del argv
    if _TARGET.value:
        if not _COMPILE_ONLY.value:
            sys.exit("error: --target compiles without running: add --compile_only")
        config = make_config(
            _DEPTH.value, _WIDTH.value, _CROP.value, _IMAGES.value, _DTYPE.value, _WEAK.value,
            remat=_REMAT.value,
        )  # fmt: skip
        return compile_for_target(config, _TARGET.value, _JSON_OUT.value)
    if _SIMULATED_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _SIMULATED_DEVICES.value)
        jax.config.update("jax_platforms", "cpu")
    config = make_config(
        _DEPTH.value,
        _WIDTH.value,
        _CROP.value,
        _IMAGES.value,
        _DTYPE.value,
        _WEAK.value,
        remat=_REMAT.value,
    )
    if _BEFORE_CONTRAST.value:
        config.loss.contrast_start = 10**9  # Every benchmarked step is before it.
    config_lib.validate(config, jax.device_count())
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"
    images = f"{_IMAGES.value}+{_IMAGES.value}"
    setting = (
        f"device={jax.device_count()}x{jax.devices()[0].device_kind} model=ResNet-{_DEPTH.value} "
        f"width={_WIDTH.value} crop={_CROP.value} images_per_device={images} "
        f"dtype={_DTYPE.value} remat={_REMAT.value} "
        f"before_contrast_start={_BEFORE_CONTRAST.value}"
    )
    if _COMPILE_ONLY.value:
        result = compile_only(config)
        print(setting)
        print(f"lower_s={result['lower_s']:.1f}")
        print(f"compile_s={result['compile_s']:.1f}")
        for name, value in (result["memory"] or {}).items():
            print(f"{name}={value:.2f}")
        print(f"gflop_per_device_step={fmt(result['gflop_per_device_step'])}")
        return
    result = run(config, _STEPS.value)
    peak = None if result["memory"] is None else result["memory"]["peak_memory_gb"]
    print(setting)
    print(
        "| device | model | crop | images/device (src+tgt) | dtype | remat | lower s | compile s "
        "| step s | images/s | GFLOP/step | GFLOP/s | peak GB (XLA) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {result['device']} | ResNet-{_DEPTH.value} w{_WIDTH.value} | {_CROP.value} "
        f"| {images} | {_DTYPE.value} | {_REMAT.value} | {result['lower_s']:.1f} "
        f"| {result['compile_s']:.1f} | {result['step_s']:.2f} | {result['images_per_s']:.2f} "
        f"| {fmt(result['gflop_per_step'])} | {fmt(result['gflop_per_s'])} | {fmt(peak)} |"
    )


if __name__ == "__main__":
    cli_errors.run_tool(main)
