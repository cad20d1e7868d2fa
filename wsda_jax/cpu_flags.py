"""XLA:CPU flags that make the ResNet training step faster on the CPU.

XLA reads `XLA_FLAGS` once, when JAX initialises its backends, so
`apply_cpu_defaults()` must run before the first JAX computation (at the top of
`main` and of the benchmarks). The flags only concern the CPU backend; on a GPU
host they change nothing that runs on the accelerator.

Chosen with `wsda_jax.tools.benchmarks.model` (DeepLabV2-ResNet-101, one 256x256
image, fwd+bwd, median of 3) on jax 0.10.2, 2 shared cores under a load of 7-10
(absolute times inflated ~4x, the ranking is what counts):

    1x1 convs as   YNN fusion flag                                   seconds
    conv           (XLA default)                                      23.6
    conv           -individual_convolution,-individual_dot            18.6
    dot            (XLA default)                                      23.8
    dot            '' (YNNPACK off)                                   22.2
    dot            -individual_convolution                            16.8
    dot            -individual_convolution,-individual_dot             9.4
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
