"""XLA:CPU flags that make the ResNet training step faster on the CPU.

XLA reads `XLA_FLAGS` once, when JAX initialises its backends, so
`apply_cpu_defaults()` must run before the first JAX computation (at the top of
`main` and of the benchmarks). The flags only concern the CPU backend; on a GPU
host they change nothing that runs on the accelerator.

Chosen by `python -m wsda_jax.benchmarks.model` on jax 0.10.2 (see that module
and the numbers in its docstring).
"""

from __future__ import annotations

import os

DEFAULT_FLAGS = (
    # YNNPACK's convolutions and dots were slower than XLA's own (Eigen) kernels
    # for the ResNet-101 fwd+bwd; keep YNNPACK for everything else.
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot",
)


def apply_cpu_defaults(flags: tuple[str, ...] = DEFAULT_FLAGS) -> str:
    """Appends each flag to `os.environ['XLA_FLAGS']` unless that flag is already set.

    A flag the user already gave (same `--name`, whatever its value) wins.
    Returns the resulting `XLA_FLAGS`.
    """
    current = os.environ.get("XLA_FLAGS", "")
    present = {item.split("=", 1)[0] for item in current.split()}
    added = [flag for flag in flags if flag.split("=", 1)[0] not in present]
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return os.environ["XLA_FLAGS"]
