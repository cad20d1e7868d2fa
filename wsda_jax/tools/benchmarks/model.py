"""Times DeepLabV2-ResNet forward+backward on the CPU (one image per size), or with
`--arch=daformer` the MiT encoder beside DAFormer's own torch encoder.

    python -m wsda_jax.tools.benchmarks.model --runs=10 --sizes=256,512
    DAFORMER_SOURCE=/path/to/DAFormer /work/venv-torch/bin/python -m \
        wsda_jax.tools.benchmarks.model --arch=daformer --sizes=512 --batches=1,2 --runs=3

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

from wsda_jax.models import deeplab, mix_transformer  # noqa: E402
from wsda_jax.tools.benchmarks import daformer_torch  # noqa: E402

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


def time_mit(
    variant: str, batch: int, size: int, runs: int, unroll: bool = False
) -> dict[str, list[float]]:
    """Our MiT encoder (eval mode, float32; blocks unrolled if `unroll`): seconds of `runs`
    jitted forward calls and forward+backward calls of sum_stages mean(out^2) w.r.t. all
    parameters, after one compiling call each (its seconds under 'compile_fwd',
    'compile_fwd_bwd')."""
    model = mix_transformer.MixTransformer(variant=variant, unroll=unroll)
    params = host_random_variables(model, 64)["params"]
    images = jnp.asarray(
        np.random.default_rng(1).standard_normal((batch, size, size, 3)), jnp.float32
    )

    def loss(params, images):
        outputs = model.apply({"params": params}, images, train=False)
        return sum(jnp.mean(out * out) for out in outputs)

    result = {}
    fns = {"fwd": jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)),
           "fwd_bwd": jax.jit(jax.value_and_grad(loss))}  # fmt: skip
    for key, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(params, images))
        result["compile_" + key] = time.perf_counter() - start
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            jax.block_until_ready(fn(params, images))
            times.append(time.perf_counter() - start)
        result[key] = times
    return result


def daformer_rows(variant: str, sizes: Sequence[int], batches: Sequence[int], runs: int,
                  source: str, unroll: bool = False) -> list[str]:  # fmt: skip
    """Lines of a table: ours (blocks unrolled if `unroll`) vs DAFormer's torch encoder
    (when torch imports and `source` names a DAFormer checkout), medians of `runs`, the
    ratio ours / torch."""
    try:
        import torch  # noqa: F401 - only to know whether the torch side can run.
    except ImportError:
        source = ""
    lines = [f"{'benchmark':28} {'batch':>5} {'size':>5} {'ours s':>8} {'torch s':>8} "
             f"{'ratio':>6} {'compile s':>9} {'load':>5}"]  # fmt: skip
    for size in sizes:
        for batch in batches:
            ours = time_mit(variant, batch, size, runs, unroll)
            theirs = None
            if source:
                theirs = daformer_torch.time_encoder(source, variant, batch, size, runs)
            for key in ("fwd", "fwd_bwd"):
                median = statistics.median(ours[key])
                torch_s = theirs["median"][key] if theirs else None
                ratio = f"{median / torch_s:6.2f}" if torch_s else f"{'-':>6}"
                torch_col = f"{torch_s:8.2f}" if torch_s else f"{'-':>8}"
                lines.append(
                    f"{'mit_' + variant + '_encoder_' + key:28} {batch:>5} {size:>5} "
                    f"{median:8.2f} {torch_col} {ratio} {ours['compile_' + key]:9.1f} "
                    f"{os.getloadavg()[0]:5.1f}"
                )
    return lines


_ARCH = flags.DEFINE_enum("arch", "deeplabv2", ["deeplabv2", "daformer"], "Which network.")
_MIT = flags.DEFINE_enum("mit", "b5", list(mix_transformer.VARIANTS), "daformer: MiT variant.")
_MIT_UNROLL = flags.DEFINE_bool(
    "mit_unroll", False, "daformer: the blocks unrolled, as config.model.mit_unroll."
)
_BATCHES = flags.DEFINE_list("batches", ["1", "2"], "daformer: batch sizes.")
_DAFORMER_SOURCE = flags.DEFINE_string(
    "daformer_source", os.environ.get("DAFORMER_SOURCE", ""),
    "daformer: a DAFormer checkout, to time its torch encoder in the same run.",
)  # fmt: skip
_RUNS = flags.DEFINE_integer("runs", 10, "Timed calls per size (after one compiling call).")
_SIZES = flags.DEFINE_list("sizes", ["256", "512"], "Square image sizes, one image each.")
_DEPTH = flags.DEFINE_integer("depth", 101, "ResNet depth.")
_WIDTH = flags.DEFINE_integer("width", 64, "ResNet stem width.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv: Sequence[str]) -> None:
    del argv
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    if _ARCH.value == "daformer":
        sizes, batches = [int(s) for s in _SIZES.value], [int(b) for b in _BATCHES.value]
        lines = daformer_rows(
            _MIT.value, sizes, batches, _RUNS.value, _DAFORMER_SOURCE.value, _MIT_UNROLL.value
        )
        print("\n".join(lines))
        return
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
