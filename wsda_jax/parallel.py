"""Data parallelism: one 1-D ('data',) mesh, steps as jit(shard_map), batch placement.

The state is replicated (P()) and the batch is split along its leading axis
(P('data')); the steps reduce over 'data' themselves (see steps.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

P = jax.sharding.PartitionSpec
AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh ('data',) over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def shard_train_step(step_fn: Callable, mesh: jax.sharding.Mesh, **static_kwargs: Any) -> Callable:
    """jit(shard_map(step_fn)) with the state replicated and the batch split over 'data'.

    `static_kwargs` (model, optimizer, config) are bound with functools.partial. The
    state argument is donated. Returns fn(state, batch) -> (state, metrics).
    """
    fn = functools.partial(step_fn, axis_name=AXIS, **static_kwargs)
    mapped = jax.shard_map(
        fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=True
    )
    return jax.jit(mapped, donate_argnums=0)


def shard_eval_step(eval_fn: Callable, mesh: jax.sharding.Mesh, **static_kwargs: Any) -> Callable:
    """jit(shard_map(eval_fn)): fn(variables, batch) -> psum-ed confusion matrix (replicated)."""
    fn = functools.partial(eval_fn, axis_name=AXIS, **static_kwargs)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=True)
    return jax.jit(mapped)


def put_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places this process's numpy batch as global arrays sharded P('data') on the mesh."""
    sharding = jax.sharding.NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Replicates a pytree (the train state) on every device of the mesh."""
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, P()))
