"""Environment for tests that run `python -m wsda_jax...` in a subprocess."""

import os


def jax_env(base, devices: int | None = None) -> dict[str, str]:
    """CPU-only JAX sharing one compilation cache under pytest's base temp directory
    (`base`), with most XLA optimisations off: tiny models compile much faster."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    )
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env
