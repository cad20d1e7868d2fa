"""Accelerator targets for ahead-of-time compilation, and the fit verdict (no JAX here).

Each `Target` names a device (its XLA description for GPUs, its topology for TPU
slices), its memory per device, the share of it a train step may use (`usable_gb`), and
the peak rates that the step-time estimate (`aot.roofline_ms`) divides by. `verdict`
turns a compiled program's peak memory into the one line that `--mode=compile` prints.
The figures are the vendors' published ones; XLA:GPU reads `GpuSpec` as the
`GpuTargetConfigProto` that XLA's own target specs
(`xla/backends/gpu/target_config/specs/*.txtpb`) hold.
"""

from __future__ import annotations

import dataclasses

import ml_collections

GB = 1e9


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The facts of one GPU that XLA:GPU's compiler reads (a GpuTargetConfigProto)."""

    name: str
    compute_capability: tuple[int, int]
    core_count: int
    fpus_per_core: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    memory_bytes: int
    memory_bandwidth: int  # bytes/s
    l2_cache_size: int
    clock_rate_ghz: float


def gpu_target_config(spec: GpuSpec) -> str:
    """The GpuTargetConfigProto text of `spec` (the fields of XLA's target specs,
    `xla/backends/gpu/target_config/specs/*.txtpb`, that jaxlib 0.10.2 reads)."""
    major, minor = spec.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {spec.core_count}
  fpus_per_core: {spec.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec.memory_bandwidth}
  l2_cache_size: {spec.l2_cache_size}
  clock_rate_ghz: {spec.clock_rate_ghz}
  device_memory_size: {spec.memory_bytes}
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{spec.name}"
"""


_H100 = GpuSpec(
    "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 84942979072, 3352320000000,
    52428800, 1.98,
)  # fmt: skip
_H200 = dataclasses.replace(
    _H100, name="NVIDIA H200 141GB HBM3e", memory_bytes=151397597184, memory_bandwidth=4.8e12
)
_A100_40 = GpuSpec(
    "NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 167936, 166912, 42331013120, 1555200000000,
    41943040, 1.41,
)  # fmt: skip
_A100_80 = dataclasses.replace(
    _A100_40, name="NVIDIA A100-SXM4-80GB", memory_bytes=85100068864, memory_bandwidth=2039040000000
)

# JAX preallocates this fraction of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION);
# a program that needs more fails at run time unless the fraction is raised.
GPU_USABLE_FRACTION = 0.75
# The TPU compiler itself refuses a program larger than the HBM it reports; a few
# percent stay free for the runtime's own buffers.
TPU_USABLE_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target: its devices, memory and peak rates (for the estimates)."""

    name: str  # The --target value.
    platform: str  # 'cuda' or 'tpu'.
    memory_gb: float  # Memory per device, GB (1e9 bytes).
    usable_fraction: float  # Of memory_gb, what the train step may use.
    peak_tflops: float  # Dense bfloat16 matrix rate per device.
    peak_tflops_float32: float  # float32 convolutions/dots at default precision.
    bandwidth_gbs: float  # Memory bandwidth per device, GB/s.
    gpu: GpuSpec | None = None
    gpus: int = 8  # GPUs: one host of this many.
    tpu_topology: str = ""  # TPUs: get_topology_desc(topology_name=...).
    tpu_chips_per_host: tuple[int, int, int] = (2, 2, 1)

    @property
    def usable_gb(self) -> float:
        return self.memory_gb * self.usable_fraction

    def reserve_text(self) -> str:
        """How the usable memory is chosen, for printing next to the verdict."""
        if self.platform == "cuda":
            return (
                f"usable {self.usable_gb:.1f} GB: JAX preallocates "
                f"{GPU_USABLE_FRACTION:.0%} of a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION)"
            )
        return f"usable {self.usable_gb:.1f} GB: {1 - TPU_USABLE_FRACTION:.0%} kept for the runtime"


def _gpu_target(name: str, spec: GpuSpec, tflops: float, tflops32: float) -> Target:
    memory = spec.memory_bytes / GB
    return Target(
        name, "cuda", memory, GPU_USABLE_FRACTION, tflops, tflops32,
        spec.memory_bandwidth / GB, gpu=spec,
    )  # fmt: skip


def _tpu_target(name, hbm_gib, tflops, bandwidth, topology, chips) -> Target:
    return Target(
        name, "tpu", hbm_gib * 2**30 / GB, TPU_USABLE_FRACTION, tflops, tflops, bandwidth,
        tpu_topology=topology, tpu_chips_per_host=chips,
    )  # fmt: skip


# Peak rates are the vendors' dense figures; float32 on GPUs is TF32 (XLA's default for
# convolutions and dots on Ampere and later), on TPUs one bfloat16 MXU pass (default
# precision). A TPU "-8" slice name counts TensorCores: v4-8 and v5p-8 are 4 chips
# (one device per chip, megacore), v5e-8 is 8 chips.
TARGETS = {
    target.name: target
    for target in (
        _gpu_target("h100", _H100, 989.0, 494.7),
        _gpu_target("h200", _H200, 989.0, 494.7),
        _gpu_target("a100", _A100_80, 312.0, 156.0),
        _gpu_target("a100-40gb", _A100_40, 312.0, 156.0),
        _tpu_target("tpu-v4-8", 32, 275.0, 1228.0, "v4:2x2x1", (2, 2, 1)),
        _tpu_target("tpu-v5e-8", 16, 197.0, 819.0, "v5e:2x4", (2, 4, 1)),
        _tpu_target("tpu-v5p-8", 95, 459.0, 2765.0, "v5p:2x2x1", (2, 2, 1)),
    )
}


# What to try next, in order, when a config does not fit: each keeps the global batch.
SUGGESTIONS = (
    ("model.remat", "none", "conv_outputs"),
    ("model.remat", "conv_outputs", "blocks"),
    ("compute_dtype", "float32", "bfloat16"),
)


def suggestion(config: ml_collections.ConfigDict) -> str:
    """The next memory-saving override for `config` (remat, then bfloat16, then half the
    per-device batch on twice the devices)."""
    for key, current, better in SUGGESTIONS:
        section, _, name = key.rpartition(".")
        value = (config[section] if section else config)[name]
        if key == "model.remat" and config.model.arch == "daformer":
            current, better = "none", "blocks"  # MiT's only mode ('conv_outputs' is ResNet's).
        if value == current:
            return f"--config.{key}={better}"
    half = config.per_device_batch_size // 2
    if half >= 1:
        return f"--config.per_device_batch_size={half} on twice the devices (same global batch)"
    return "a device with more memory"


def verdict(peak_gb: float | None, target: Target, config: ml_collections.ConfigDict) -> str:
    """The one-line answer: 'fits: 11.9 of 80 GB per device (...)' or 'does not fit: ...;
    try ...'. `peak_gb` None = the compiler refused without naming a size."""
    total = f"{target.memory_gb:.0f} GB per device"
    if peak_gb is not None and peak_gb <= target.usable_gb:
        return f"fits: {peak_gb:.1f} of {total} ({target.reserve_text()})"
    need = "more than the memory" if peak_gb is None else f"{peak_gb:.1f}"
    return f"does not fit: {need} of {total} ({target.reserve_text()}); try {suggestion(config)}"


def compile_mode(config: ml_collections.ConfigDict, target_name: str | None) -> str:
    """`main --mode=compile`: the fit verdict of `config` on the named target. Sets the GPU
    flags and the CPU host before JAX starts (so call it before any JAX computation)."""
    from wsda_jax import gpu_flags

    target = TARGETS.get(target_name)
    if target is None:
        raise ValueError(f"--mode=compile needs --target, one of: {', '.join(TARGETS)}")
    gpu_flags.apply_gpu_defaults(gpu=target.platform == "cuda")
    from wsda_jax import aot, config_lib

    aot.use_cpu_host()
    config_lib.validate(config, 1)
    return aot.fit_check(config, target)
