"""Environment and helpers for tests that run `python -m wsda_jax...` in a subprocess."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/synthetic_coarse.py:tiny"
# XLA:CPU's fast-compile preset, without its fusion emitters: the tests' tiny programs
# compile faster (measured in docs/testing.md).
FAST_COMPILE_FLAGS = (
    "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
    "--xla_cpu_use_fusion_emitters=false",
)


def xla_flags(devices: int | None = None) -> str:
    """The tests' XLA_FLAGS: the fast-compile flags and, if given, `devices` simulated
    CPU devices."""
    count = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    return " ".join([*FAST_COMPILE_FLAGS, *count])


def compilation_cache_dir(base) -> str:
    """The persistent compilation cache of the whole pytest run: under the run's root
    temp directory, shared by both pytest-xdist workers (a program that one compiled, the
    other reads), else under `base` (pytest's base temp directory)."""
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return str(root / "jax_cache")


def jax_env(base, devices: int | None = None) -> dict[str, str]:
    """CPU-only JAX sharing the run's compilation cache (`compilation_cache_dir`), with
    most XLA optimisations off and the fast-compile flags: tiny models compile much
    faster."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=compilation_cache_dir(base),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        XLA_FLAGS=xla_flags(devices),
    )
    return env


def run_main(base, *args, timeout=600):
    """Runs `python -m wsda_jax.main ARGS` with the compilation cache and (for a synthetic
    config) the generated dataset under `base`; returns the CompletedProcess."""
    command = [sys.executable, "-m", "wsda_jax.main", *args]
    if any(a.startswith("--config=") and "synthetic" in a for a in args):
        command.append(f"--config.data.data_dir={base / 'data'}")
    return subprocess.run(
        command, cwd=ROOT, env=jax_env(base), capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result, expected):
    """Exit status 1, no traceback, one `error: ` line on stderr that contains `expected`."""
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-4000:]
    assert expected in errors[0]


def copy_workdir(workdir, tmp_path):
    """A copy of a shared run's workdir under `tmp_path`, for a test that changes it."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy
