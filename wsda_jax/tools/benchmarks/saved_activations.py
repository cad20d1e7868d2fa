"""Where a train step's activation memory goes: what its gradient keeps from the forward.

    python -m wsda_jax.tools.benchmarks.saved_activations \
        --config=configs/gta2cs_coarse.py:daformer --config.compute_dtype=bfloat16 \
        --config.model.remat=blocks

Traces the configured train step (the program `--mode=compile` compiles: for 'adapt'
the one with the contrastive losses) for one device on the CPU, and lists the residuals
that JAX's reverse-mode differentiation of the student's loss keeps from the forward
passes for the backward pass, summed by the Flax module that computed them (a stage's
blocks are one loop: one place) or, outside the model, by the innermost source line of this package.
Nothing is compiled and nothing runs, so a MiT-B5 step
at 512x512 takes a minute or two on a laptop.

These are JAX's residuals before XLA's fusion and scheduling: the compiled program can
keep less (XLA recomputes or fuses some of them; its peak also holds the backward pass's
own temporaries), so the numbers map where the memory comes from rather than measure
it; `--mode=compile --target=...` measures (docs/aot.md).
"""

from __future__ import annotations

from wsda_jax import cli_errors, cpu_flags

cpu_flags.apply_cpu_defaults()  # Before JAX initialises its backend.

import collections  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from wsda_jax import aot, config_lib, config_model, parallel  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Residuals:
    """The residuals that one operation kind of one place computed: `where` is the Flax
    module path ('backbone/block3/attn'; a stage's blocks are one loop, so one place) or,
    outside the model, the innermost source line of this package ('losses.py:49'); `what`
    the primitive ('mul', 'convert_element_type'; 'argument' for a parameter kept as is,
    'loop input' for what a loop iteration received, e.g. a rematerialised block's input)."""

    where: str
    what: str
    count: int
    nbytes: int


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Name-stack entries that are not modules: transformations (jvp(DAFormer), jit(f)), einsum
# specs ('bhwi,io->bhwo') and the functions Flax lifts into a loop ('block3._block_step').
_TRANSFORM = re.compile(r"^\w+\(.*\)$")
_LIFTED_FUNCTION = re.compile(r"^\w+\.\w+$")
_CLASS_NAME = re.compile(r"^[A-Z]\w*$")
_INPUTS = "(inputs)"
_NESTED_PROGRAMS = ("scan", "jit", "pjit")  # Whose 'jaxpr' maps outputs one-to-one.


def _module_path(name_stack: str) -> str:
    """The Flax module path in a name stack, transformations and the top-level module's
    class name ('DAFormer', which a jitted `model.apply` adds) dropped."""
    names = [
        n
        for n in name_stack.split("/")
        if n and not _TRANSFORM.match(n) and not _LIFTED_FUNCTION.match(n) and "->" not in n
    ]
    if names and _CLASS_NAME.match(names[0]):
        names = names[1:]
    return "/".join(names)


def _package_line(traceback) -> str:
    """'file.py:LINE' of the innermost frame in this package ('?' if none)."""
    for frame in traceback.frames if traceback else ():
        if frame.file_name.startswith(_PACKAGE_DIR + os.sep):
            return f"{os.path.relpath(frame.file_name, _PACKAGE_DIR)}:{frame.line_num}"
    return "?"


def _origin(var: Any, jaxpr: Any) -> tuple[str, str]:
    """(where, what) computed `var` in `jaxpr`. An output of a loop (stacked over its
    iterations) or of a jitted call is traced to the operation inside that computed it,
    under the loop's or call's module path."""
    if isinstance(var, jax.extend.core.Literal):
        return _INPUTS, "constant"
    eqn = next((e for e in jaxpr.eqns if any(v is var for v in e.outvars)), None)
    if eqn is None:
        return _INPUTS, "argument" if any(v is var for v in jaxpr.invars) else "constant"
    where = _module_path(str(eqn.source_info.name_stack))
    if eqn.primitive.name not in _NESTED_PROGRAMS:
        return where or _package_line(eqn.source_info.traceback), eqn.primitive.name
    body = eqn.params["jaxpr"].jaxpr
    inner = body.outvars[eqn.outvars.index(var)]
    inner_where, what = _origin(inner, body)
    if inner_where == _INPUTS:  # Placed where the body first uses it.
        user = next((e for e in body.eqns if any(v is inner for v in e.invars)), None)
        inner_where = _module_path(str(user.source_info.name_stack)) if user else ""
        what = "loop input" if eqn.primitive.name == "scan" else "argument"
    if inner_where == "?" or not (where or inner_where):  # No place inside: the call's.
        return where or _package_line(eqn.source_info.traceback), what
    if ".py:" in inner_where:
        return inner_where, what
    return "/".join(p for p in (where, inner_where) if p), what


def residuals(fn: Callable, *args: Any) -> list[Residuals]:
    """What reverse-mode differentiation of `fn` at `args` (arrays or ShapeDtypeStructs)
    keeps from the forward pass, grouped by place and primitive, largest first."""
    closed, (_, vjp_shape) = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a), return_shape=True)(*args)
    jaxpr = closed.jaxpr
    kept = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(vjp_shape)) :]
    sizes: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for var in kept:
        aval = var.aval
        sizes[_origin(var, jaxpr)].append(int(np.prod(aval.shape)) * aval.dtype.itemsize)
    rows = [Residuals(where, what, len(n), sum(n)) for (where, what), n in sizes.items()]
    return sorted(rows, key=lambda row: -row.nbytes)


@contextlib.contextmanager
def _recording_gradients(record: list) -> Iterator[None]:
    """Within the block, `jax.value_and_grad(fn)(params)` (how both steps differentiate
    the student's loss) also appends the `residuals` of `fn` at `params` to `record`."""
    value_and_grad = jax.value_and_grad

    def recording(fn, argnums=0, has_aux=False, **kwargs):
        def differentiated(*args):
            loss = (lambda *a: fn(*a)[0]) if has_aux else fn
            record.append(residuals(loss, *args))
            return value_and_grad(fn, argnums=argnums, has_aux=has_aux, **kwargs)(*args)

        return differentiated

    with mock.patch.object(jax, "value_and_grad", recording):
        yield


def saved_activations(config: ml_collections.ConfigDict) -> list[Residuals]:
    """The residuals of `config`'s train step on one device (module docstring), largest
    first."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    model, optimizer, program = aot.train_program(config, mesh)
    state = aot.abstract_state(config, model, optimizer, mesh)
    record: list = []
    with _recording_gradients(record):
        jax.eval_shape(program, state, aot.abstract_batch(config, mesh))
    if len(record) != 1:
        raise RuntimeError(f"expected one differentiated loss in the step, traced {len(record)}")
    return record[0]


def table(rows: list[Residuals], top: int) -> str:
    """A markdown table of the `top` largest rows and the total of all."""
    total = sum(row.nbytes for row in rows)
    lines = ["| MB | residuals | where | computed by |", "|---|---|---|---|"]
    for row in rows[:top]:
        lines.append(f"| {row.nbytes / 1e6:,.1f} | {row.count} | {row.where} | {row.what} |")
    lines.append(f"| {total / 1e6:,.1f} | {sum(r.count for r in rows)} | (all) | |")
    return "\n".join(lines)


def _run(argv: Sequence[str]) -> None:
    del argv
    config = flags.FLAGS.config
    if config is None:
        raise ValueError("--config is required, e.g. --config=configs/gta2cs_coarse.py:daformer")
    config_lib.validate(config, num_devices=1)
    print(
        f"{config_model.model_name(config)}, {config.stage}, "
        f"{config.per_device_batch_size} images per domain of {tuple(config.data.crop_size)}, "
        f"{config.compute_dtype}, remat={config.model.remat}: tracing ...",
        flush=True,
    )
    print(table(saved_activations(config), flags.FLAGS.top))


def main(argv: Sequence[str]) -> None:
    cli_errors.run_reporting_errors(_run, argv)


def define_flags() -> None:
    """The command's flags, defined when it runs (importing the module defines none, so
    it can share a process with other tools that define --config)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_integer("top", 25, "Rows to print (the largest).")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli_errors.parse_flags)
