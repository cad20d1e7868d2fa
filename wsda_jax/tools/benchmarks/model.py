"""Times DeepLabV2-ResNet forward+backward on the CPU (one image per size).

    python -m wsda_jax.tools.benchmarks.model --runs=10 --sizes=256,512

What is timed: one jitted call computing the gradient w.r.t. all parameters of a
cross-entropy-like scalar of the three model outputs, BatchNorm in train mode
(updated statistics returned), i.e. the model part of a training step. The
median of `--runs` calls after one compiling call, and its ratio to the PyTorch
reference (TORCH_REFERENCE_S below; none measured at other sizes).
"""

from __future__ import annotations

from wsda_jax import cli_errors, cpu_flags

cpu_flags.apply_cpu_defaults()  # Before JAX initialises its backend.

import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import flax.traverse_util  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from wsda_jax.models import deeplab  # noqa: E402

# A torchvision DeepLabV2-ResNet-101 (output stride 8, four dilated classifier convs,
# projection head), forward + backward of one image, torch 2.14.1 on the 2-core CPU
# machine (2 threads): (low, high) seconds over quiet runs.
TORCH_REFERENCE_S = {256: (2.1, 2.6)}


def host_random_variables(model: deeplab.DeepLabV2, size: int, seed: int = 0) -> dict:
    """Random float32 variables from the model's shapes, drawn with NumPy.

    Compiling `model.init` for ResNet-101 costs far longer than the benchmark
    itself on XLA:CPU (random-number kernels), and the values do not matter here.
    """
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in flax.traverse_util.flatten_dict(shapes).items():
        if path[-1] == "kernel":
            value = rng.standard_normal(leaf.shape) * np.sqrt(1.0 / np.prod(leaf.shape[:-1]))
        elif path[-1] in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        flat[path] = jnp.asarray(value, jnp.float32)
    return flax.traverse_util.unflatten_dict(flat)


def make_grad_fn(model: deeplab.DeepLabV2):
    """Jitted `(params, batch_stats, images, labels) -> (loss, new_stats, grads)`."""

    def loss_fn(params, batch_stats, images, labels):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        full = jax.nn.log_softmax(out.logits)
        low = jax.nn.log_softmax(out.lowres_logits)
        low_labels = labels[:, ::8, ::8]
        loss = -jnp.mean(jnp.take_along_axis(full, labels[..., None], axis=-1))
        loss -= jnp.mean(jnp.take_along_axis(low, low_labels[..., None], axis=-1))
        loss -= jnp.mean(out.features[..., 0])
        return loss, updates["batch_stats"]

    @jax.jit
    def grad_fn(params, batch_stats, images, labels):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels
        )
        return loss, stats, grads

    return grad_fn


def time_fwd_bwd(
    model: deeplab.DeepLabV2, size: int, runs: int, batch: int = 1
) -> tuple[float, float, list[float]]:
    """Returns (compile+first call seconds, median seconds, all timed seconds)."""
    variables = host_random_variables(model, size)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_classes, (batch, size, size)), jnp.int32)
    grad_fn = make_grad_fn(model)
    args = (variables["params"], variables["batch_stats"], images, labels)
    start = time.perf_counter()
    jax.block_until_ready(grad_fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(grad_fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), times


def benchmark_rows(
    sizes: Sequence[int] = (256, 512),
    runs: int = 10,
    depth: int = 101,
    width: int = 64,
    num_classes: int = 19,
    dtype: str = "float32",
) -> list[dict]:
    """One row per image size: fwd+bwd seconds of one image, median over `runs`.

    Row keys: name, size, runs, median_s, min_s, first_call_s, torch_s (low, high),
    ratio (median / PyTorch reference at its high and low end; None where no reference
    was measured), load
    (1-minute load average after timing: on a shared machine, a load above the
    core count means the times are inflated).
    """
    model = deeplab.DeepLabV2(
        num_classes=num_classes,
        depth=depth,
        width=width,
        dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype],
    )
    rows = []
    for size in sizes:
        first, median, times = time_fwd_bwd(model, size, runs)
        torch_s = (
            TORCH_REFERENCE_S.get(size) if (depth, width, dtype) == (101, 64, "float32") else None
        )
        rows.append(
            dict(
                name=f"deeplabv2_r{depth}_w{width}_{dtype}_fwd_bwd",
                size=size,
                runs=runs,
                median_s=median,
                min_s=min(times),
                first_call_s=first,
                torch_s=torch_s,
                ratio=None if torch_s is None else (median / torch_s[1], median / torch_s[0]),
                load=os.getloadavg()[0],
            )
        )
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    """A small fixed-width table of `benchmark_rows` output."""
    lines = [
        f"{'benchmark':36} {'size':>5} {'runs':>4} {'median s':>9} {'min s':>7} "
        f"{'1st call s':>10} {'torch s':>7} {'ratio':>9} {'load':>5}"
    ]
    for r in rows:
        torch_s = "-" if r["torch_s"] is None else "-".join(f"{t:.1f}" for t in r["torch_s"])
        ratio = "-" if r["ratio"] is None else "-".join(f"{t:.2f}" for t in r["ratio"])
        lines.append(
            f"{r['name']:36} {r['size']:>5} {r['runs']:>4} {r['median_s']:>9.2f} "
            f"{r['min_s']:>7.2f} {r['first_call_s']:>10.1f} {torch_s:>7} {ratio:>9} "
            f"{r['load']:>5.1f}"
        )
    return "\n".join(lines)


_RUNS = flags.DEFINE_integer("runs", 10, "Timed calls per size (after one compiling call).")
_SIZES = flags.DEFINE_list("sizes", ["256", "512"], "Square image sizes, one image each.")
_DEPTH = flags.DEFINE_integer("depth", 101, "ResNet depth.")
_WIDTH = flags.DEFINE_integer("width", 64, "ResNet stem width.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv: Sequence[str]) -> None:
    del argv
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    rows = benchmark_rows(
        sizes=[int(s) for s in _SIZES.value],
        runs=_RUNS.value,
        depth=_DEPTH.value,
        width=_WIDTH.value,
        dtype=_DTYPE.value,
    )
    print(format_rows(rows))


if __name__ == "__main__":
    cli_errors.run_tool(main)
