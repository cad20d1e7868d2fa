"""Processes and data parallelism: `jax.distributed`, one 1-D ('data',) mesh, steps as
jit(shard_map), batch placement.

The state is replicated (P()) and the batch is split along its leading axis
(P('data')); the steps reduce over 'data' themselves (see steps.py).

Several processes (multi-host GPU or TPU): `initialize_processes` calls
`jax.distributed.initialize()` when the environment says this is one of several
processes: JAX_COORDINATOR_ADDRESS set, a SLURM job with more than one task
(SLURM_NTASKS), Open MPI (OMPI_COMM_WORLD_SIZE), a multi-host Cloud TPU
(TPU_WORKER_HOSTNAMES with a comma), or WSDA_DISTRIBUTED=1 (the launch scripts set it);
elsewhere give coordinator_address, num_processes and process_id to every process.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

P = jax.sharding.PartitionSpec
AXIS = "data"


def distributed_arguments(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> dict[str, Any]:
    """The explicit jax.distributed.initialize arguments ({} if none); all or none must be
    given. Raises a one-line ValueError otherwise."""
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(value is None for value in given.values()):
        return {}
    missing = [f"--{name}" for name, value in given.items() if value is None]
    if missing:
        raise ValueError(f"several processes by hand need {', '.join(missing)} as well")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    _host_and_port(coordinator_address)
    return given


def _host_and_port(address: str) -> tuple[str, int]:
    """('host', port) of 'HOST:PORT' ('[::1]:1234' too); a one-line ValueError otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address={address!r}: expected HOST:PORT of process 0")
    return host.strip("[]"), int(port)


def is_multiprocess(arguments: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> bool:
    """True when explicit arguments are given or the environment names several processes."""
    return bool(
        arguments
        or env.get("WSDA_DISTRIBUTED") == "1"
        or env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )


# How long processes wait for each other to start (jax.distributed's default).
STARTUP_TIMEOUT_S = 300


def initialize_processes(arguments: Mapping[str, Any]) -> None:
    """jax.distributed.initialize(**arguments) when this is one of several processes.

    Given by hand, a process other than 0 first waits for the coordinator to answer, so
    that a wrong address or a process 0 that never started is one line, not JAX's abort
    (a C++ stack trace) after the timeout."""
    if not is_multiprocess(arguments):
        return
    if arguments:
        logging.info(
            "Process %d of %d: joining the others at %s (each wait up to %d s).",
            arguments["process_id"],
            arguments["num_processes"],
            arguments["coordinator_address"],
            STARTUP_TIMEOUT_S,
        )
        if arguments["process_id"] > 0:
            wait_for_coordinator(arguments["coordinator_address"], STARTUP_TIMEOUT_S)
    jax.distributed.initialize(**arguments, initialization_timeout=STARTUP_TIMEOUT_S)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once something accepts connections at HOST:PORT `address`; a one-line
    ValueError when nothing has after `timeout_s`."""
    host_and_port = _host_and_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(host_and_port, timeout=5):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"--coordinator_address={address}: nothing answered there in "
                    f"{timeout_s:g} s ({error.strerror or error}); start process 0 "
                    "(--process_id=0) with the same address, or correct it"
                ) from error
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh ('data',) over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes, as jax.sharding.Mesh: the steps place data by shard_map, not by types.
    return jax.make_mesh(
        (len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


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


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The state's sharding: a full copy on every device of `mesh`."""
    return jax.sharding.NamedSharding(mesh, P())


def split_over_data(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """A batch's sharding: its leading axis split over the 'data' axis of `mesh`."""
    return jax.sharding.NamedSharding(mesh, P(AXIS))


def abstract_on(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves with `sharding` (a compile or restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def put_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Places this process's numpy batch as global arrays sharded P('data') on the mesh."""
    sharding = split_over_data(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Replicates a pytree (the train state) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
