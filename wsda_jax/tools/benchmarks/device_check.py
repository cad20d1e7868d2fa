"""The first thing to run on an accelerator: correctness, speed and memory in one table.

    bash launch/device_check.sh              # on whatever accelerator JAX sees
    bash launch/device_check.sh --dry_run    # tiny sizes on the CPU (what the tests run)

Three checks, printed as ONE markdown table (paste it into the README as-is):
  1. The tiny adaptation step (ResNet-18, one block per stage, 32x32, 2 + 2 images),
     two steps on the default device against the same two steps on the CPU: the losses
     must agree within `TINY_RTOL` (float32 convolutions on Ampere+ GPUs use TF32 by
     default, ~1e-3 relative per layer; a wrong kernel is off by far more).
  2. The reference-size steps in float32 and bfloat16, each in its own process (so the
     peak-memory counter and the compile are its own): DeepLabV2-ResNet-101 at 512x512
     with 4 + 4 images on one device, and MiT-B5 + DAFormer head with DAFormer's recipe
     (`configs/gta2cs_coarse.py:daformer`, 2 + 2 images): compile time, median step
     time, images/s, achieved TFLOP/s (XLA's cost analysis / step time), MFU against the
     device's peak (`PEAK_TFLOPS`, matched on `jax.devices()[0].device_kind`) and the
     peak memory from `device.memory_stats()`.
  3. 50 steps of `configs/synthetic_coarse.py` from the real input pipeline (a small
     copy of the embedded dataset is generated in a temporary directory), with
     `loss.contrast_start=25`: the median time per step before and after the
     contrastive and image-level losses switch on.
Not yet timed on an accelerator: each reference row stops at `--reference_timeout_s`
(300 s), and `--reference_archs=deeplabv2` leaves the two DAFormer rows out.
"""

from __future__ import annotations

import os

from wsda_jax import cli_errors, cpu_flags, gpu_flags

cpu_flags.apply_cpu_defaults()  # Before JAX initialises its backend.
gpu_flags.apply_gpu_defaults()  # On a GPU host: what main sets for training.
# This process and each reference row's subprocess share one accelerator: by default
# JAX's GPU client takes 75% of the memory at start-up, so the first process would hold
# what the next needs. Each takes what it uses (a flag the user set wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from wsda_jax import (  # noqa: E402
    config_lib,
    config_model,
    config_presets,
    optim,
    parallel,
    train,
    train_state,
)
from wsda_jax.data import pipeline, sources  # noqa: E402
from wsda_jax.models import deeplab  # noqa: E402
from wsda_jax.tools.benchmarks import train_step as bench  # noqa: E402

_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Tiny sizes everywhere (CPU-friendly).")
_PART = flags.DEFINE_enum(
    "part", "all", ["all", "reference"], "Internal: 'reference' runs one check-2 row."
)
_DTYPE = flags.DEFINE_enum(
    "reference_dtype", "float32", config_lib.COMPUTE_DTYPES, "Internal (--part)."
)
# Every remat mode of some architecture; a row is left out where its architecture lacks it.
_REMAT_MODES = tuple(dict.fromkeys(m for modes in config_model.REMAT_MODES.values() for m in modes))


def _list_of(values: Sequence[str], flag: str):
    """A flags validator: a non-empty comma-separated list of `values`, else its message."""
    return (lambda chosen: bool(chosen) and set(chosen) <= set(values)), (
        f"--{flag}: a comma-separated list of {', '.join(values)}"
    )


_ARCHS = flags.DEFINE_list(
    "reference_archs",
    list(config_model.ARCHS),
    "Architectures of the reference rows, of "
    + ", ".join(config_model.ARCHS)
    + " (one row per dtype and remat).",
)
_DTYPES = flags.DEFINE_list(
    "reference_dtypes",
    list(config_lib.COMPUTE_DTYPES),
    "config.compute_dtype of the reference rows, of " + ", ".join(config_lib.COMPUTE_DTYPES) + ".",
)
_REMAT = flags.DEFINE_list(
    "reference_remat",
    ["none"],
    "config.model.remat settings of the reference rows (each adds a row per dtype to each "
    "architecture that has it); of " + ", ".join(_REMAT_MODES) + ".",
)
flags.register_validator("reference_archs", *_list_of(config_model.ARCHS, "reference_archs"))
flags.register_validator(
    "reference_dtypes", *_list_of(config_lib.COMPUTE_DTYPES, "reference_dtypes")
)
flags.register_validator("reference_remat", *_list_of(_REMAT_MODES, "reference_remat"))
_REFERENCE_STEPS = flags.DEFINE_integer("reference_steps", 5, "Timed reference steps.")
_SYNTHETIC_STEPS = flags.DEFINE_integer("synthetic_steps", 50, "Steps of synthetic_coarse.")
_TIMEOUT = flags.DEFINE_integer("reference_timeout_s", 300, "Limit of one reference row.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    "runs/device_check/tensorboard",
    "Where a jax.profiler trace of the last synthetic steps goes (TensorBoard, Perfetto).",
)
PROFILED_STEPS = 3

TINY_RTOL = 2e-2
# Dense peak TFLOP/s per chip: (bfloat16, float32 as XLA runs it by default). float32
# convolutions and dots run as TF32 on Ampere and later NVIDIA GPUs and as bfloat16
# passes on TPUs (default precision), so those are the float32 peaks; V100 has no
# bfloat16 units (its FP32 rate is used for both). Matched in order on device_kind.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),
    ("H200", 989.0, 494.0),
    ("A100", 312.0, 156.0),
    ("V100", 15.7, 15.7),
    ("L4", 121.0, 60.0),
    ("TPU v4", 275.0, 275.0),
    ("TPU v5 lite", 197.0, 197.0),
    ("TPU v5e", 197.0, 197.0),
    ("TPU v5p", 459.0, 459.0),
    ("TPU v5", 459.0, 459.0),
)
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")
HEADER = (
    "| check | setting | compile s | step s | images/s | TFLOP/s | MFU | peak GB | result |",
    "|---|---|---|---|---|---|---|---|---|",
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak TFLOP/s for `dtype`, None for a device not in the table."""
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def tiny_config():
    """The test suite's tiny adaptation step (`config_presets.tiny_step`)."""
    return config_presets.tiny_step()


def _tiny_losses(config, mesh: jax.sharding.Mesh, step, state, batch) -> list[float]:
    """Total loss of two calls of `step` on `mesh` from the host `state`."""
    state = parallel.replicate(state, mesh)
    totals = []
    for _ in range(2):
        state, metrics = step(state, parallel.put_batch(batch, mesh))
        totals.append(float(metrics["total"]))
    return totals


def tiny_check() -> str:
    """Check 1 as a table row: the tiny step on the default device against the CPU."""
    config = tiny_config()
    model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS names the accelerator only.
        return "| 1. tiny step | | | | | | | | FAILED: no CPU backend; unset JAX_PLATFORMS |"
    with jax.default_device(cpu):
        state = jax.device_get(
            train_state.create_train_state(
                config, model, jax.random.PRNGKey(0), (1, 32, 32, 3), optim.make_optimizer(config)
            )
        )
    batch = bench.random_batch(config)
    meshes = {"device": parallel.make_mesh(jax.devices()[:1]), "cpu": parallel.make_mesh([cpu])}
    step_fns = {name: bench.make_step(config, mesh)[2] for name, mesh in meshes.items()}
    if jax.devices()[0] == cpu:  # A dry run: the same program twice, compiled once.
        meshes["cpu"], step_fns["cpu"] = meshes["device"], step_fns["device"]
    start = time.perf_counter()
    device_losses = _tiny_losses(config, meshes["device"], step_fns["device"], state, batch)
    seconds = time.perf_counter() - start
    cpu_losses = _tiny_losses(config, meshes["cpu"], step_fns["cpu"], state, batch)
    error = max(abs(a / b - 1) for a, b in zip(device_losses, cpu_losses, strict=True))
    ok = error <= TINY_RTOL and all(np.isfinite(device_losses))
    verdict = "ok" if ok else "MISMATCH"
    losses = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(device_losses, cpu_losses, strict=True))
    return (
        f"| 1. tiny step: {jax.devices()[0].platform} vs cpu | ResNet-18 1 block/stage, 32x32, "
        f"2+2, float32, 2 steps | {seconds:.1f} (both steps) | | | | | | {verdict}: losses "
        f"device/cpu {losses}, max rel. diff {error:.1e} (tol {TINY_RTOL:g}) |"
    )


def reference_settings(
    archs: Sequence[str], remats: Sequence[str], dtypes: Sequence[str]
) -> list[tuple[str, str, str]]:
    """(arch, remat, dtype) of each reference row, in that order; a remat mode that an
    architecture does not have (the MiT has no `conv_outputs`) is left out for it."""
    return [
        (arch, remat, dtype)
        for arch in archs
        for remat in remats
        if remat in config_model.REMAT_MODES[arch]
        for dtype in dtypes
    ]


def reference_config(arch: str, dtype: str, remat: str, dry_run: bool):
    """Check 2's config: the reference size of `arch`, or the tiny step for a dry run."""
    if dry_run:
        config = tiny_config()
        if arch == "daformer":  # The tiny MiT of `config_presets`' ':tiny' presets.
            config.model.arch = arch
            config.model.mit_embed_dims, config.model.mit_depths = (8, 8, 10, 16), (1, 1, 1, 1)
            config.model.decoder_dim = 16
            config.loss.imnet_fd = 0.005
    elif arch == "daformer":
        config = config_presets.reference("gta5", "adapt", "coarse", "daformer")
        config.loss.contrast_start = 0
    else:
        config = bench.make_config(101, 64, 512, 4, dtype, "coarse")
    config.compute_dtype = dtype
    config.model.remat = remat
    return config


def reference_result(arch: str, dtype: str, remat: str, dry_run: bool, num_steps: int) -> dict:
    """Check 2 in this process: compile and time one step size, with peak memory."""
    config = reference_config(arch, dtype, remat, dry_run)
    crop, images = config.data.crop_size[0], bench.global_batch_size(config)
    result = bench.run(config, num_steps)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    flops = result["gflop_per_step"]
    tflops = None if flops is None else flops / 1e3 / result["step_s"] / jax.device_count()
    peak_tf = peak_tflops(jax.devices()[0].device_kind, dtype)
    return {
        "setting": f"{config_model.model_name(config)}, {crop}x{crop}, {images}+{images}, "
        f"{dtype}, remat={remat}",
        "compile_s": result["lower_s"] + result["compile_s"],
        "step_s": result["step_s"],
        "images_per_s": result["images_per_s"],
        "tflop_per_s": tflops,
        "mfu": None if tflops is None or peak_tf is None else tflops / peak_tf,
        "peak_gb": None if peak is None else peak / 1e9,
        "total_loss": result["total_loss"],
    }


def reference_row(arch: str, dtype: str, remat: str, dry_run: bool) -> str:
    """Check 2 as a table row, run in a subprocess (its own compile and memory peak)."""
    command = [
        sys.executable,
        "-m",
        "wsda_jax.tools.benchmarks.device_check",
        "--part=reference",
        f"--reference_archs={arch}",
        f"--reference_dtype={dtype}",
        f"--reference_remat={remat}",
        f"--reference_steps={_REFERENCE_STEPS.value}",
    ] + (["--dry_run"] if dry_run else [])
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_TIMEOUT.value, check=False
        )
    except subprocess.TimeoutExpired:
        return (
            f"| 2. reference step | {arch}, {dtype} | | | | | | | FAILED: over {_TIMEOUT.value} s |"
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        errors = [line for line in done.stderr.splitlines() if ERROR_LINE.match(line)]
        last = (errors or done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return (
            f"| 2. reference step | {arch}, {dtype} | | | | | | | FAILED (rc {done.returncode}): "
            f"{last} |"
        )
    r = json.loads(lines[-1])
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)
    verdict = "ok" if np.isfinite(r["total_loss"]) else "NON-FINITE LOSS"
    return (
        f"| 2. reference step | {r['setting']} | {r['compile_s']:.1f} | {r['step_s']:.3f} "
        f"| {r['images_per_s']:.1f} | {fmt(r['tflop_per_s'], '.1f')} | {fmt(r['mfu'], '.1%')} "
        f"| {fmt(r['peak_gb'], '.2f')} | {verdict}: loss {r['total_loss']:.3f} |"
    )


def synthetic_config(dry_run: bool, data_dir: str, num_steps: int):
    """configs/synthetic_coarse.py (':tiny' for a dry run) on a small generated copy."""
    config = config_presets.synthetic(
        stage="adapt", weak_label="coarse", arg="tiny" if dry_run else None
    )
    config.data.data_dir = data_dir
    config.data.synthetic.num_source = min(config.data.synthetic.num_source, 64)
    config.data.synthetic.num_target_train = min(config.data.synthetic.num_target_train, 64)
    config.data.synthetic.num_target_val = min(config.data.synthetic.num_target_val, 8)
    config.num_steps = num_steps
    # Half the steps before the contrastive terms switch on; a dry run compiles only the
    # full program (each tiny compile costs more than the whole run).
    config.loss.contrast_start = 0 if dry_run else num_steps // 2
    return config


def synthetic_row(dry_run: bool, num_steps: int, profile_dir: str) -> str:
    """Check 3 as a table row: the real loop's data and steps, timed per step; the last
    PROFILED_STEPS steps are traced into `profile_dir` (where the step's time goes)."""
    with tempfile.TemporaryDirectory() as data_dir:
        config = synthetic_config(dry_run, data_dir, num_steps)
        start = time.perf_counter()
        data = sources.open_datasets(config)
        prepare_s = time.perf_counter() - start
        mesh = parallel.make_mesh()
        model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
        optimizer = optim.make_optimizer(config)
        iterator = pipeline.make_train_iterator(
            config, data.source, data.target, num_local_devices=jax.local_device_count()
        )
        state = train_state.create_train_state(
            config, model, jax.random.PRNGKey(config.seed), optimizer=optimizer, mesh=mesh
        )
        step_fn = train.make_train_step(config, model, optimizer, mesh)
        times, losses = [], []
        traced = range(max(1, num_steps - PROFILED_STEPS), num_steps)
        for step in range(num_steps):
            batch = parallel.put_batch(next(iterator), mesh)
            if step == traced.start:
                jax.profiler.start_trace(profile_dir)
            start = time.perf_counter()
            state, metrics = step_fn(state, batch, step)
            losses.append(float(metrics["total"]))  # Waits for the step.
            times.append(time.perf_counter() - start)
        if traced:
            jax.profiler.stop_trace()
        iterator.close()
    switch = config.loss.contrast_start
    before = f"{statistics.median(times[1:switch]):.3f}" if switch > 1 else "n/a"
    after = statistics.median(times[switch + 1 :]) if num_steps > switch + 1 else times[-1]
    compile_s = times[0] + (times[switch] if switch else 0.0)
    images = 2 * bench.global_batch_size(config)
    verdict = "ok" if np.all(np.isfinite(losses)) else "NON-FINITE LOSS"
    return (
        f"| 3. synthetic_coarse | {num_steps} steps, {images // 2}+{images // 2} images, "
        f"{config.data.crop_size[0]}x{config.data.crop_size[1]}, contrast_start={switch} "
        f"| {compile_s:.1f} (first steps) | {before} before / {after:.3f} "
        f"from contrast_start | {images / after:.1f} | | | | {verdict}: loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f} (data generated in {prepare_s:.0f} s) |"
    )


def main(argv: Sequence[str]) -> None:
    del argv
    dry_run = _DRY_RUN.value
    if dry_run:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_disable_most_optimizations", True)  # Faster tiny compiles.
    if _PART.value == "reference":
        result = reference_result(
            _ARCHS.value[0], _DTYPE.value, _REMAT.value[0], dry_run, _REFERENCE_STEPS.value
        )
        print(json.dumps(result))
        return
    device = jax.devices()[0]
    profile_dir = os.path.abspath(_PROFILE_DIR.value)
    checks = [tiny_check]
    for arch, remat, dtype in reference_settings(_ARCHS.value, _REMAT.value, _DTYPES.value):
        checks.append(functools.partial(reference_row, arch, dtype, remat, dry_run))
    synthetic_steps = 4 if dry_run else _SYNTHETIC_STEPS.value
    checks.append(functools.partial(synthetic_row, dry_run, synthetic_steps, profile_dir))
    print(f"Device check: {jax.device_count()}x {device.device_kind} ({device.platform}), ", end="")
    print(f"jax {jax.__version__}{', DRY RUN (tiny sizes)' if dry_run else ''}")
    print("\n".join(HEADER), flush=True)
    rows = []
    for check in checks:  # Each row as it finishes: a run cut short keeps what it measured.
        rows.append(check())
        print(rows[-1], flush=True)
    print(
        f"Profile of the last synthetic_coarse steps: {profile_dir} (tensorboard --logdir "
        "with the profile plugin, or the trace.json.gz in Perfetto)."
    )
    if any("FAILED" in row or "MISMATCH" in row or "NON-FINITE" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    cli_errors.run_tool(main)
