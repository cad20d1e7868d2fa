"""XLA:GPU flags that the train and eval steps need to compile, set before JAX starts.

XLA:GPU's Triton GEMM path (jax 0.10.2, compiling for an H100) fails on this model's
matrix multiplications in two ways (docs/aot.md "The Triton failures"): it aborted the
whole process (`Check failed: subdim_size_accumulator == dim_size` in
`triton_tiling_propagation.cc`) on the dot fed by a strided slice (now a strided
convolution, `models.resnet.Conv1x1`), and it stops the compile with `INTERNAL:
Couldn't find output tile sizes` on the float32 HIGHEST-precision dots of
`jax.image.resize` (the bilinear upsampling of the logits: the train step at 512x512,
the eval step already at 64x128). `--xla_gpu_enable_triton_gemm=false` leaves dots to cuBLAS
(convolutions go to cuDNN either way) and both steps compile. Like `cpu_flags`, the
flags go into `XLA_FLAGS`, which XLA reads once when a backend starts, so
`apply_gpu_defaults()` runs before the first JAX computation; a flag the user already
set wins.

Whether this process will use a GPU is decided from what is known before JAX starts:
`JAX_PLATFORMS` when it is set (it names the backends JAX may use), otherwise whether a
CUDA plugin for JAX is installed (JAX then prefers the GPU when there is one; on a
host without a GPU the flag is read by nobody).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping

from wsda_jax import cpu_flags

DEFAULT_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)

# The packages through which jax finds a CUDA backend (jax[cuda12], jax[cuda13]).
CUDA_PLUGIN_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin")
_GPU_PLATFORM_NAMES = ("cuda", "gpu")


def _module_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def will_use_gpu(
    env: Mapping[str, str] = os.environ,
    module_installed: Callable[[str], bool] = _module_installed,
) -> bool:
    """True when JAX in this process may compile for a CUDA GPU (see the module doc)."""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return any(name.strip() in _GPU_PLATFORM_NAMES for name in platforms.split(","))
    return any(module_installed(name) for name in CUDA_PLUGIN_MODULES)


def apply_gpu_defaults(gpu: bool | None = None) -> str:
    """Adds DEFAULT_FLAGS to `os.environ['XLA_FLAGS']` when `gpu` (default:
    `will_use_gpu()`); a flag the user already gave keeps its value. Returns XLA_FLAGS."""
    if gpu is None:
        gpu = will_use_gpu()
    if not gpu:
        return os.environ.get("XLA_FLAGS", "")
    return cpu_flags.apply_cpu_defaults(DEFAULT_FLAGS)
