"""Ahead-of-time compilation for accelerators (wsda_jax.aot), the fit verdict and the GPU flags.

The compile tests need the optional packages of requirements-aot.txt and are skipped
without them (the system interpreter); run them with the venv that has them:
    /work/venv-aot/bin/python -m pytest tests/test_aot.py
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from subprocesses import jax_env

from wsda_jax import aot, aot_targets, config_lib, gpu_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TRITON_FLAG = "--xla_gpu_enable_triton_gemm"


def _compile_mode(tmp_path_factory, target: str) -> subprocess.CompletedProcess:
    """`main --mode=compile --target=...` on the tiny synthetic config, in a fresh process."""
    env = jax_env(tmp_path_factory.getbasetemp())
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS")  # Memory figures of the real compile.
    return subprocess.run(
        [
            sys.executable, "-m", "wsda_jax.main", "--config=configs/synthetic_coarse.py:tiny",
            "--mode=compile", f"--target={target}",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="no jax-cuda12-plugin (requirements-aot.txt)")
def test_tiny_step_compiles_for_h100(tmp_path_factory):
    result = _compile_mode(tmp_path_factory, "h100")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fits: 0.0 of 85 GB per device"), lines


# The tiny model's train-mode forward for an H100 with XLA's default GPU flags (Triton
# GEMMs on): the dot of a strided 1x1 convolution once aborted the process here.
_FORWARD_WITH_TRITON_GEMMS = """
import functools, jax, jax.numpy as jnp
from wsda_jax import aot, aot_targets
from wsda_jax.models import deeplab
from conftest import tiny_config
aot.use_cpu_host()
device = aot.target_devices(aot_targets.TARGETS["h100"])[0]
sharding = jax.sharding.SingleDeviceSharding(device)
model = deeplab.build_model(tiny_config())
images = jnp.zeros((2, 32, 32, 3))
variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
forward = lambda v, x: deeplab.train_forward(model, v["params"], v["batch_stats"], x)[0].features
jax.jit(forward).lower(jax.tree.map(place, variables), place(images)).compile()
print("compiled")
"""


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="no jax-cuda12-plugin (requirements-aot.txt)")
def test_forward_compiles_for_h100_with_triton_gemms(tmp_path_factory):
    env = jax_env(tmp_path_factory.getbasetemp())
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS")  # The GPU compiler's own passes, all of them.
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    result = subprocess.run(
        [sys.executable, "-c", _FORWARD_WITH_TRITON_GEMMS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.strip() == "compiled"


@pytest.mark.skipif(not HAS_LIBTPU, reason="no libtpu (requirements-aot.txt)")
def test_tiny_step_compiles_for_tpu_v5e(tmp_path_factory):
    result = _compile_mode(tmp_path_factory, "tpu-v5e-8")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fits: 0.0 of 17 GB per device"), lines


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="jax-cuda12-plugin is installed")
def test_missing_plugin_is_one_line(tmp_path_factory):
    result = _compile_mode(tmp_path_factory, "h100")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot compile for h100: jax_cuda12_plugin is not installed; {aot.INSTALL_HINT}"
    ]


def test_unknown_target_is_one_line(tmp_path_factory):
    result = _compile_mode(tmp_path_factory, "h1000")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --mode=compile needs --target, one of")


def _reference(**overrides):
    config = config_lib.base_config()
    config.model.remat = overrides.get("remat", "none")
    config.compute_dtype = overrides.get("dtype", "float32")
    config.per_device_batch_size = overrides.get("batch", 4)
    return config


def test_verdict_fits_and_does_not_fit():
    h100 = aot_targets.TARGETS["h100"]  # 84.9 GB, of which JAX preallocates 75%: 63.7 GB.
    reserve = "(usable 63.7 GB: JAX preallocates 75% of a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION))"
    assert aot_targets.verdict(11.94, h100, _reference()) == (
        f"fits: 11.9 of 85 GB per device {reserve}"
    )
    assert aot_targets.verdict(63.6, h100, _reference()).startswith("fits: 63.6 of 85 GB")
    assert aot_targets.verdict(64.0, h100, _reference()) == (
        f"does not fit: 64.0 of 85 GB per device {reserve}; try --config.model.remat=conv_outputs"
    )
    v5e = aot_targets.TARGETS["tpu-v5e-8"]
    refused = aot_targets.verdict(None, v5e, _reference(remat="blocks"))
    assert refused.startswith("does not fit: more than the memory of 17 GB per device")
    assert refused.endswith("; try --config.compute_dtype=bfloat16")


def test_suggestions_in_order():
    assert aot_targets.suggestion(_reference()) == "--config.model.remat=conv_outputs"
    assert aot_targets.suggestion(_reference(remat="conv_outputs")) == (
        "--config.model.remat=blocks"
    )
    last = _reference(remat="blocks", dtype="bfloat16")
    assert aot_targets.suggestion(last).startswith("--config.per_device_batch_size=2 on twice")
    assert aot_targets.suggestion(_reference(remat="blocks", dtype="bfloat16", batch=1)) == (
        "a device with more memory"
    )
    # DAFormer's MiT has one remat mode, 'blocks'.
    daformer = _reference()
    daformer.model.arch = "daformer"
    assert aot_targets.suggestion(daformer) == "--config.model.remat=blocks"
    daformer.model.remat = "blocks"
    assert aot_targets.suggestion(daformer) == "--config.compute_dtype=bfloat16"


def test_required_gb_from_tpu_error():
    message = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Used 17.31G of 15.75G hbm."
    assert aot.required_gb_from_error(message) == pytest.approx(17.31 * 2**30 / 1e9)
    assert aot.required_gb_from_error("RESOURCE_EXHAUSTED: something else") is None


def test_hlo_facts_count_fusions_calls_and_host_transfers():
    def step(x, w):
        y = jnp.sort(x @ w, axis=0)
        return jnp.tanh(y) * 2.0 + 1.0

    args = (jnp.ones((8, 4)), jnp.ones((4, 4)))
    plain = aot.hlo_facts(jax.jit(step).lower(*args).compile().as_text())
    assert plain["slow_ops"].get("sort") == 1
    assert plain["host_transfers"] == {}
    assert plain["instructions"] > 0

    def with_callback(x, w):
        jax.debug.callback(lambda v: None, x)
        return step(x, w)

    called = aot.hlo_facts(jax.jit(with_callback).lower(*args).compile().as_text())
    assert called["host_transfers"], called


def test_hlo_facts_of_a_written_module():
    text = """
    %fused_computation (p: f32[4]) -> f32[4] {
      %p = f32[4]{0} parameter(0)
      ROOT %t = f32[4]{0} tanh(%p)
    }
    ENTRY %main (a: f32[4], b: f32[2,2]) -> f32[4] {
      %a = f32[4]{0} parameter(0)
      %cc = (f32[2,2]{1,0}, s8[0]{0}) custom-call(%b), custom_call_target="__cublas$gemm"
      %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation
      %g = f32[4]{0} fusion(%f), backend_config={"fusion_backend_config":{"kind":"__triton"}}
      %o = token[] outfeed(%g, %tok)
      ROOT %s = f32[4]{0} scatter(%g, %i, %u), to_apply=%add
    }
    """
    facts = aot.hlo_facts(text)
    assert facts["fusions"] == 2
    assert facts["custom_calls"] == {"__cublas$gemm": 1}
    assert facts["triton_fusions"] == 1
    assert facts["slow_ops"] == {"scatter": 1}
    assert facts["host_transfers"] == {"outfeed": 1}


def test_roofline_is_the_larger_of_compute_and_memory_time():
    v5e = aot_targets.TARGETS["tpu-v5e-8"]
    compute = aot.roofline_ms(v5e, "bfloat16", 197e12, None)
    assert compute == pytest.approx(1000.0)
    assert aot.roofline_ms(v5e, "bfloat16", 197e12, 819e9 * 2) == pytest.approx(2000.0)
    assert aot.roofline_ms(v5e, "float32", None, 1e9) is None


def test_cpu_cost_lowers_the_mit_blocks_unrolled(monkeypatch):
    """XLA's cost analysis counts a loop's body once, so the FLOPs come from a lowering
    with the MiT's blocks unrolled; the caller's config is left as it was."""
    lowered_with = []

    class Lowered:
        def cost_analysis(self):
            return {"flops": 7.0, "bytes accessed": 3.0}

    def lower(config, devices):
        lowered_with.append((config.model.mit_unroll, devices[0].platform))
        return Lowered()

    monkeypatch.setattr(aot, "lower", lower)
    config = config_lib.base_config()
    assert aot.cpu_cost(config) == {"flops": 7.0, "bytes_accessed": 3.0}
    assert lowered_with == [(True, "cpu")]
    assert config.model.mit_unroll is False


def test_flops_of_a_program_with_loops_come_from_the_unrolled_lowering(monkeypatch):
    """A compiled program's own cost analysis gives the FLOPs unless it has a loop, whose
    body it counts once; then the CPU lowering's (`cpu_cost`, MiT blocks unrolled)."""
    x = jnp.ones((8, 64))
    programs = {
        "plain": lambda x: jnp.tanh(x @ x.T),
        "loop": lambda x: jax.lax.fori_loop(0, 5, lambda i, c: jnp.tanh(c @ c.T), x @ x.T),
    }
    monkeypatch.setattr(aot, "target_devices", lambda target: jax.devices("cpu")[:1])
    monkeypatch.setattr(aot, "cpu_cost", lambda config: {"flops": 123.0})
    flops = {}
    for name, fn in programs.items():
        monkeypatch.setattr(aot, "lower", lambda config, devices, fn=fn: jax.jit(fn).lower(x))
        result = aot.compile_for_target(None, aot_targets.TARGETS["h100"])
        flops[name] = (result.flops, bool(result.hlo["slow_ops"].get("while")))
    assert flops["loop"] == (123.0, True)
    assert flops["plain"][1] is False and flops["plain"][0] >= 2 * 8 * 64 * 8


def test_gpu_flag_set_for_a_gpu_platform_and_absent_elsewhere(monkeypatch):
    never, always = (lambda name: False), (lambda name: True)
    assert gpu_flags.will_use_gpu({"JAX_PLATFORMS": "cuda"}, never)
    assert gpu_flags.will_use_gpu({"JAX_PLATFORMS": "cpu,gpu"}, never)
    assert not gpu_flags.will_use_gpu({"JAX_PLATFORMS": "cpu"}, always)
    assert not gpu_flags.will_use_gpu({"JAX_PLATFORMS": "tpu"}, always)
    assert gpu_flags.will_use_gpu({}, lambda name: name == "jax_cuda12_plugin")
    assert not gpu_flags.will_use_gpu({}, never)

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert TRITON_FLAG not in gpu_flags.apply_gpu_defaults(gpu=False)
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    assert gpu_flags.apply_gpu_defaults(gpu=True) == (f"--xla_dump_to=/tmp/x {TRITON_FLAG}=false")
    monkeypatch.setenv("XLA_FLAGS", f"{TRITON_FLAG}=true")  # The user's own value wins.
    assert gpu_flags.apply_gpu_defaults(gpu=True) == f"{TRITON_FLAG}=true"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS")
    assert TRITON_FLAG not in gpu_flags.apply_gpu_defaults()


def test_sweep_figure_names_round_trip_and_table(tmp_path):
    from wsda_jax.tools.benchmarks import aot_sweep

    for figure in (
        ("tpu-v5e-8", "gta_source_only", "conv_outputs", "bfloat16", 0),
        ("h100", "gta2cs_coarse", "none", "float32", 2),
        ("tpu-v5e-8", "gta2cs_coarse:daformer", "blocks", "bfloat16", 4),
    ):
        assert aot_sweep.parse_figure(aot_sweep.figure_name(*figure)) == figure
    assert "_gta2cs_coarse-daformer_" in aot_sweep.figure_name(
        "h100", "gta2cs_coarse:daformer", "none", "float32"
    )
    config = aot_sweep.reference_config("gta2cs_coarse:daformer", "blocks", "bfloat16", 4)
    assert (config.model.arch, config.model.remat, config.per_device_batch_size) == (
        "daformer",
        "blocks",
        4,
    )
    crashed = {"figure": "h100_gta2cs_coarse_float32_remat-none", "returncode": -6}
    (tmp_path / "crashed.json").write_text(json.dumps(crashed))
    rows = aot_sweep.table(str(tmp_path)).splitlines()
    assert rows[-1].startswith("| h100 | gta2cs_coarse | float32 | none |")
    assert rows[-1].endswith("compiler crashed (exit -6) |")


def test_workdir_needed_except_for_compile(tmp_path_factory):
    result = subprocess.run(
        [sys.executable, "-m", "wsda_jax.main", "--config=configs/synthetic_coarse.py:tiny"],
        cwd=REPO, env=jax_env(tmp_path_factory.getbasetemp()), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: --mode=train needs --workdir"]
