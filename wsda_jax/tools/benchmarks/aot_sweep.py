"""The fit table: the reference configs compiled for each accelerator target, one at a time.

    nice -n 19 /work/venv-aot/bin/python -m wsda_jax.tools.benchmarks.aot_sweep \
        --targets=h100,tpu-v5e-8,a100,tpu-v4-8,tpu-v5p-8,h200 > /tmp/aot_sweep.log 2>&1 &

Figures: for each target, each reference config (`configs/gta2cs_coarse.py`, stage 2;
`configs/gta_source_only.py`, stage 1; 512x512 crops, 4 (+4) images per device;
`gta2cs_coarse:daformer`, DAFormer's recipe on MiT-B5, 2 + 2 images), each
`config.model.remat` of its architecture (none, conv_outputs, blocks) and each dtype
(float32, bfloat16),
`wsda_jax.aot.compile_for_target` in its own process (a compiler abort loses one
figure, not the sweep), written to `docs/results/aot/<figure>.json` (`aot.summary`).
A figure whose file exists is skipped, so a cut sweep restarts where it stopped.
`--dtypes`, `--remats` and `--configs` narrow the sweep (TPU compiles of ResNet-101 take
more than 10 minutes on 2 cores). Needs requirements-aot.txt.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import flags

from wsda_jax import cli_errors, config_model, gpu_flags
from wsda_jax.aot_targets import TARGETS

# A config module, optionally with its variant after a colon (`module:arg`, as
# `--config=configs/module.py:arg`); figure names write the colon as '-'.
CONFIGS = ("gta2cs_coarse", "gta_source_only", "gta2cs_coarse:daformer")
REMATS = ("none", "conv_outputs", "blocks")
DTYPES = ("bfloat16", "float32")
OUT_DIR = os.path.join("docs", "results", "aot")

_TARGETS = flags.DEFINE_list("targets", ["h100"], f"Of {', '.join(TARGETS)}.")
_CONFIGS = flags.DEFINE_list("configs", list(CONFIGS), "Reference config modules.")
_REMATS = flags.DEFINE_list("remats", list(REMATS), "config.model.remat values.")
_DTYPES = flags.DEFINE_list("dtypes", list(DTYPES), "config.compute_dtype values.")
_BATCH = flags.DEFINE_integer("per_device_batch_size", 0, "Override (0: the config's).")
_OUT_DIR = flags.DEFINE_string("out_dir", OUT_DIR, "Where the figures go.")
_FIGURE = flags.DEFINE_string("figure", None, "Internal: compile this one figure.")
_TABLE = flags.DEFINE_bool("table", False, "Only print the finished figures as a markdown table.")


def figure_name(target: str, config: str, remat: str, dtype: str, batch: int = 0) -> str:
    """'h100_gta2cs_coarse_bfloat16_remat-none' (+ '_batch-2' with a batch override);
    config 'gta2cs_coarse:daformer' is written 'gta2cs_coarse-daformer'."""
    name = f"{target}_{config.replace(':', '-')}_{dtype}_remat-{remat}"
    return f"{name}_batch-{batch}" if batch else name


def parse_figure(name: str) -> tuple[str, str, str, str, int]:
    """The inverse of figure_name."""
    rest, batch = name, 0
    if "_batch-" in rest:
        rest, batch_text = rest.rsplit("_batch-", 1)
        batch = int(batch_text)
    rest, remat = rest.rsplit("_remat-", 1)
    target, rest = rest.split("_", 1)
    config, dtype = rest.rsplit("_", 1)
    return target, config.replace("-", ":"), remat, dtype, batch


def reference_config(config: str, remat: str, dtype: str, batch: int = 0):
    """The reference config (`module` or `module:arg`) with the sweep's overrides."""
    module, _, arg = config.partition(":")
    result = importlib.import_module(f"configs.{module}").get_config(arg or None)
    result.model.remat = remat
    result.compute_dtype = dtype
    if batch:
        result.per_device_batch_size = batch
    return result


def compile_figure(name: str, out_dir: str) -> None:
    """Compiles one figure in this process and writes its JSON."""
    target_name, config_name, remat, dtype, batch = parse_figure(name)
    target = TARGETS[target_name]
    gpu_flags.apply_gpu_defaults(gpu=target.platform == "cuda")  # Before JAX starts.
    from wsda_jax import aot

    aot.use_cpu_host()
    config = reference_config(config_name, remat, dtype, batch)
    info = aot.summary(aot.compile_for_target(config, target), target, config)
    info.update(config=config_name, xla_flags=os.environ.get("XLA_FLAGS", ""))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as file:
        json.dump(info, file, indent=1)
    print(f"{name}: {info['verdict']} (compile {info['compile_s']:.0f} s)", flush=True)


def run_figure(name: str, out_dir: str) -> None:
    """compile_figure in a subprocess; a crash is written down as the figure's result."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "wsda_jax.tools.benchmarks.aot_sweep", f"--figure={name}"]
    result = subprocess.run(
        [*command, f"--out_dir={out_dir}"], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        print(result.stdout.strip(), flush=True)
        return
    tail = [line for line in result.stderr.splitlines() if line.strip()][-5:]
    print(f"{name}: FAILED (exit {result.returncode})\n  " + "\n  ".join(tail), flush=True)
    if result.returncode in (-9, -15, 137, 143):  # Killed from outside: try again later.
        return
    with open(os.path.join(out_dir, f"{name}.json"), "w") as file:
        json.dump(
            {"figure": name, "returncode": result.returncode, "stderr_tail": tail,
             "seconds": round(time.perf_counter() - start)},
            file, indent=1,
        )  # fmt: skip


def table(out_dir: str) -> str:
    """The finished figures of `out_dir` as markdown: one row per figure."""
    rows = [
        "| target | config | dtype | remat | batch/device | peak GB/device | of GB (usable) "
        "| compile s | GFLOP/device step | step ms (roofline estimate) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, spec=".1f": "n/a" if x is None else format(x, spec)
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name)) as file:
            info = json.load(file)
        if "verdict" not in info:  # A compiler crash.
            target, config, remat, dtype, _ = parse_figure(info["figure"])
            rows.append(
                f"| {target} | {config} | {dtype} | {remat} | | | | | | | compiler crashed "
                f"(exit {info['returncode']}) |"
            )
            continue
        flops = info["flops_per_device_step"]
        rows.append(
            f"| {info['target']} | {info['config']} | {info['dtype']} | {info['remat']} "
            f"| {info['per_device_batch_size']} | {fmt(info['peak_memory_gb'])} "
            f"| {info['device_memory_gb']:.0f} ({info['usable_memory_gb']:.1f}) "
            f"| {info['compile_s']:.0f} | {fmt(flops and flops / 1e9, '.0f')} "
            f"| {fmt(info['roofline_step_ms_estimate'])} "
            f"| {info['verdict'].split(' (')[0].split(':')[0]} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str]) -> None:
    del argv
    if _TABLE.value:
        return print(table(_OUT_DIR.value))
    if _FIGURE.value:
        return compile_figure(_FIGURE.value, _OUT_DIR.value)
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    for flag, given, known in (
        ("targets", _TARGETS.value, TARGETS),
        ("configs", _CONFIGS.value, CONFIGS),
        ("remats", _REMATS.value, REMATS),
        ("dtypes", _DTYPES.value, DTYPES),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            sys.exit(f"error: unknown --{flag} {unknown}: expected some of {list(known)}")
    from wsda_jax import aot

    for reason in filter(None, (aot.missing_package(TARGETS[name]) for name in _TARGETS.value)):
        sys.exit(f"error: {reason}")  # Before any figure: a crash would be written down.
    for target, config, remat, dtype in itertools.product(
        _TARGETS.value, _CONFIGS.value, _REMATS.value, _DTYPES.value
    ):
        name = figure_name(target, config, remat, dtype, _BATCH.value)
        arch = reference_config(config, "none", dtype).model.arch
        if remat not in config_model.REMAT_MODES[arch]:
            continue  # e.g. 'conv_outputs' is a ResNet mode.
        if os.path.exists(os.path.join(_OUT_DIR.value, f"{name}.json")):
            continue
        run_figure(name, _OUT_DIR.value)


if __name__ == "__main__":
    cli_errors.run_tool(main)
