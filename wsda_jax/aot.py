"""Deviceless ahead-of-time compilation of the train step for GPU and TPU targets.

The configured train step (the program `train.make_train_step` runs: `steps.adapt_step`
with the contrastive losses on, or `steps.source_only_step`) is lowered from
`jax.ShapeDtypeStruct`s of the train state and of one batch, with the same mesh and
`shard_map` as training, and compiled by the accelerator's own XLA compiler on this
host: no accelerator, no weights, nothing runs. The target's devices come from
`jax.experimental.topologies.get_topology_desc`: the CUDA plugin (`jax-cuda12-plugin`,
`jax-cuda12-pjrt`) for GPUs, described by XLA's `GpuTargetConfigProto`, and `libtpu`
for TPU slices (`requirements-aot.txt`). JAX itself runs on the CPU (`jax_platforms`
must be `cpu` before any backend starts: `use_cpu_host()`).

What a compile gives (`AotResult`): XLA's memory analysis of one device's program
(arguments, outputs, aliased = the donated state, temporaries; peak = arguments +
outputs - aliased + temporaries), the compile time, FLOPs and bytes per device step,
facts read from the compiled HLO (`hlo_facts`) and the fit verdict (`verdict`) against
the target's memory less a runtime reserve (`Target.usable_gb`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from wsda_jax import config_model, optim, parallel, steps, train_state
from wsda_jax.aot_targets import GB, Target, gpu_target_config, verdict
from wsda_jax.models import deeplab

INSTALL_HINT = "pip install -r requirements-aot.txt (in a virtual environment; see docs/aot.md)"
# The module each platform's compiler comes from (requirements-aot.txt).
COMPILER_MODULES = {"cuda": "jax_cuda12_plugin", "tpu": "libtpu"}


class MissingPackagesError(ValueError):
    """The optional compiler package for a target is not installed (bad setup: one line)."""


def missing_package(target: Target) -> str | None:
    """The one-line reason `target` cannot be compiled for here, None if it can."""
    module = COMPILER_MODULES[target.platform]
    if importlib.util.find_spec(module) is None:
        return f"cannot compile for {target.name}: {module} is not installed; {INSTALL_HINT}"
    return None


def use_cpu_host() -> None:
    """Runs JAX on the CPU: the accelerators are only compilation targets. Call before any
    JAX computation (a backend that has started keeps running)."""
    jax.config.update("jax_platforms", "cpu")


def target_devices(target: Target) -> list[Any]:
    """The target's (deviceless) devices, from its topology description.

    Raises MissingPackagesError (one line naming requirements-aot.txt) when the CUDA
    plugin or libtpu is not importable.
    """
    from jax.experimental import topologies

    reason = missing_package(target)
    if reason:
        raise MissingPackagesError(reason)
    if target.platform == "cuda":
        topology = topologies.get_topology_desc(
            platform="cuda",
            target_config=gpu_target_config(target.gpu),
            topology=f"1x1x{target.gpus}",
        )
    else:
        topology = topologies.get_topology_desc(
            topology_name=target.tpu_topology,
            platform="tpu",
            chip_config_name="default",
            chips_per_host_bounds=target.tpu_chips_per_host,
            num_slices=1,
        )
    return list(topology.devices)


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
    """ShapeDtypeStructs of one global train batch as the pipeline delivers it (see
    ARCHITECTURE.md "Batches"), sharded P('data') on `mesh`: uint8 images and labels,
    float32 presence; 'target' only for the 'adapt' stage."""
    batch = config.per_device_batch_size * mesh.size
    height, width = config.data.crop_size
    sharding = parallel.split_over_data(mesh)

    def array(shape, dtype=jnp.uint8):
        return jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=sharding)

    out = {"source": {"image": array((height, width, 3)), "label": array((height, width))}}
    if config.stage == "adapt":
        out["target"] = {
            "image": array((height, width, 3)),
            "weak_label": array((height, width)),
            "presence": array((config.num_classes,), jnp.float32),
            "label": array((height, width)),
        }
    return out


def abstract_state(config, model, optimizer, mesh: jax.sharding.Mesh) -> train_state.TrainState:
    """ShapeDtypeStructs of the train state, replicated on `mesh` (nothing is allocated)."""
    key = jax.random.PRNGKey(config.seed)
    return train_state.create_train_state(
        config, model, key, optimizer=optimizer, mesh=mesh, abstract=True
    )


def train_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """(model, optimizer, jit(shard_map(step))) of the configured stage, as
    `train.make_train_step` builds it; for 'adapt' the program from
    `loss.contrast_start` on (the larger one: with the contrastive losses)."""
    model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
    optimizer = optim.make_optimizer(config)
    kwargs = dict(model=model, optimizer=optimizer, config=config)
    if config.stage == "adapt":
        program = parallel.shard_train_step(steps.adapt_step, mesh, contrast_on=True, **kwargs)
    else:
        program = parallel.shard_train_step(steps.source_only_step, mesh, **kwargs)
    return model, optimizer, program


def lower(config: ml_collections.ConfigDict, devices: list[Any]):
    """The train program of `config` lowered for `devices` (jax.stages.Lowered)."""
    mesh = parallel.make_mesh(devices)
    model, optimizer, program = train_program(config, mesh)
    state = abstract_state(config, model, optimizer, mesh)
    return program.lower(state, abstract_batch(config, mesh))


def memory_of(compiled) -> dict[str, float] | None:
    """XLA's memory analysis of one device's program in GB, None where the backend has none.

    peak_memory_gb = arguments + outputs - aliased (donated state) + temporaries: all
    live at once, an upper bound of what the device must hold.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # Not every backend implements it.
        return None
    if stats is None:
        return None
    argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    return {
        "argument_gb": argument / GB,
        "output_gb": output / GB,
        "alias_gb": alias / GB,
        "temp_gb": temp / GB,
        "peak_memory_gb": (argument + output - alias + temp) / GB,
    }


def cost_of(analysis) -> dict[str, float]:
    """{'flops', 'bytes_accessed'} (those present) from an XLA cost analysis."""
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    out = {}
    for key, name in (("flops", "flops"), ("bytes accessed", "bytes_accessed")):
        if analysis and analysis.get(key):
            out[name] = float(analysis[key])
    return out


def cpu_cost(config: ml_collections.ConfigDict) -> dict[str, float]:
    """FLOPs and bytes of one device's step from XLA's cost analysis of the program lowered
    for one CPU device (HLO before optimisation: no compile). The FLOPs are those of the
    convolutions and dots the step asks for; the bytes count every op's operands and
    results, as if nothing were fused (an upper bound). The analysis counts a loop's body
    once, so the MiT's blocks are lowered unrolled (`config.model.mit_unroll`)."""
    config = config.copy_and_resolve_references()
    config.model.mit_unroll = True
    return cost_of(lower(config, jax.devices("cpu")[:1]).cost_analysis())


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s+=\s+.*?\b([a-z][a-z0-9\-]*)\(", re.M)
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r'"kind":"([^"]+)"')
_HOST_OPS = ("send", "recv", "send-done", "recv-done", "infeed", "outfeed")
_SLOW_OPS = ("sort", "scatter", "gather", "while", "conditional")


def hlo_facts(hlo_text: str) -> dict[str, Any]:
    """Counts read from a compiled program's HLO text (`compiled.as_text()`).

    fusions: fusion instructions; custom_calls: by target (cuDNN convolutions, cuBLAS
    GEMMs, ...); triton_fusions: fusions XLA emits with Triton; slow_ops: sort, scatter,
    gather, while, conditional (sampling, prototypes); host_transfers: send/recv,
    infeed/outfeed and host callbacks, which a train step must not have.
    """
    ops: dict[str, int] = {}
    for match in _INSTRUCTION.finditer(hlo_text):
        ops[match.group(1)] = ops.get(match.group(1), 0) + 1
    custom: dict[str, int] = {}
    for target in _CUSTOM_TARGET.findall(hlo_text):
        custom[target] = custom.get(target, 0) + 1
    triton = sum(1 for kind in _FUSION_KIND.findall(hlo_text) if "triton" in kind.lower())
    host = {op: ops[op] for op in _HOST_OPS if ops.get(op)}
    host.update({t: n for t, n in custom.items() if "callback" in t.lower() or "host" in t.lower()})
    return {
        "fusions": ops.get("fusion", 0),
        "custom_calls": dict(sorted(custom.items(), key=lambda item: -item[1])),
        "triton_fusions": triton,
        "slow_ops": {op: ops[op] for op in _SLOW_OPS if ops.get(op)},
        "host_transfers": host,
        "instructions": sum(ops.values()),
    }


def roofline_ms(target: Target, dtype: str, flops: float | None, bytes_: float | None):
    """An ESTIMATE of one step's time in ms: max(FLOPs / peak rate, bytes / bandwidth),
    with the device at its peak; None without FLOPs. Real steps are slower."""
    if not flops:
        return None
    rate = target.peak_tflops if dtype == "bfloat16" else target.peak_tflops_float32
    seconds = flops / (rate * 1e12)
    if bytes_:
        seconds = max(seconds, bytes_ / (target.bandwidth_gbs * GB))
    return 1e3 * seconds


@dataclasses.dataclass
class AotResult:
    """One compile of the train step for a target (per-device figures)."""

    target: str
    devices: int
    device_kind: str
    lower_s: float
    compile_s: float
    memory: dict[str, float] | None
    # flops, bytes_accessed of the compiled program, where given and the program has no
    # loops (XLA's analysis counts a loop's body once).
    cost: dict[str, float]
    cpu_cost: dict[str, float]  # The same from the CPU lowering (cpu_cost), if asked.
    hlo: dict[str, Any]
    error: str = ""  # The compiler's refusal (e.g. RESOURCE_EXHAUSTED), if any.
    required_gb: float | None = None  # What the refusal says the program needs.

    @property
    def peak_gb(self) -> float | None:
        if self.memory is not None:
            return self.memory["peak_memory_gb"]
        return self.required_gb

    @property
    def flops(self) -> float | None:
        return self.cost.get("flops") or self.cpu_cost.get("flops")


_TPU_OVER_HBM = re.compile(r"Used ([0-9.]+)([KMGT])? of ([0-9.]+)([KMGT])? hbm", re.I)
_UNITS = {None: 1, "": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def required_gb_from_error(message: str) -> float | None:
    """The memory a refused program needs, from the TPU compiler's RESOURCE_EXHAUSTED
    message ('Used 17.31G of 15.75G hbm'), in GB; None if the message has none."""
    match = _TPU_OVER_HBM.search(message)
    if not match:
        return None
    return float(match.group(1)) * _UNITS[(match.group(2) or "").upper()] / GB


def compile_for_target(
    config: ml_collections.ConfigDict, target: Target, with_cpu_cost: bool = True
) -> AotResult:
    """Lowers and compiles `config`'s train step for `target`; see the module doc.

    A program the target's compiler refuses for its size (TPU: RESOURCE_EXHAUSTED) is a
    result, not an error: `error` holds the message and `required_gb` the size it names.
    """
    devices = target_devices(target)
    start = time.perf_counter()
    lowered = lower(config, devices)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    error, compiled = "", None
    try:
        compiled = lowered.compile()
    except Exception as exception:  # XlaRuntimeError; its type is not public API.
        if "RESOURCE_EXHAUSTED" not in str(exception):
            raise
        error = str(exception).strip().splitlines()[0]
    compile_s = time.perf_counter() - start
    hlo = {} if compiled is None else hlo_facts(compiled.as_text())
    cost = {} if compiled is None else cost_of(compiled.cost_analysis())
    if hlo.get("slow_ops", {}).get("while"):
        cost = {}  # The analysis counts a loop's body once: the CPU lowering's, unrolled.
    return AotResult(
        target=target.name,
        devices=len(devices),
        device_kind=devices[0].device_kind,
        lower_s=lower_s,
        compile_s=compile_s,
        memory=None if compiled is None else memory_of(compiled),
        cost=cost,
        cpu_cost=cpu_cost(config) if with_cpu_cost and "flops" not in cost else {},
        hlo=hlo,
        error=error,
        required_gb=required_gb_from_error(error) if error else None,
    )


def summary(result: AotResult, target: Target, config: ml_collections.ConfigDict) -> dict:
    """Everything about one compile as a JSON-able dict (the benchmark's and the sweep's
    output): setting, per-device memory, time, costs, HLO facts, estimate, verdict."""
    bytes_ = result.cost.get("bytes_accessed")
    estimate = roofline_ms(target, config.compute_dtype, result.flops, bytes_)
    return {
        "target": target.name,
        "devices": f"{result.devices}x {result.device_kind}",
        "stage": config.stage,
        "crop": list(config.data.crop_size),
        "per_device_batch_size": config.per_device_batch_size,
        "model": config_model.model_name(config),
        "dtype": config.compute_dtype,
        "remat": config.model.remat,
        "lower_s": round(result.lower_s, 1),
        "compile_s": round(result.compile_s, 1),
        "memory_gb": result.memory,
        "peak_memory_gb": result.peak_gb,
        "device_memory_gb": target.memory_gb,
        "usable_memory_gb": target.usable_gb,
        "compiler_error": result.error,
        "flops_per_device_step": result.flops,
        "flops_source": "compiled" if result.cost.get("flops") else "cpu lowering",
        "bytes_accessed_per_device_step": bytes_,
        "roofline_step_ms_estimate": estimate,
        "hlo": result.hlo,
        "verdict": verdict(result.peak_gb, target, config),
    }


def fit_check(config: ml_collections.ConfigDict, target: Target) -> str:
    """The one-line answer to "will `config` fit `target`?" (compiles the step)."""
    result = compile_for_target(config, target, with_cpu_cost=False)
    return verdict(result.peak_gb, target, config)
