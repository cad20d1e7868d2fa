"""The step's random streams (step_inputs) are distinct: no two draw the same numbers."""

import inspect
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np

from wsda_jax import step_inputs

RNG = jax.random.PRNGKey(11)
STEP = 5


def _stream_functions():
    """step_inputs' `*_key` / `*_keys(state, axis_name)` functions (adapt_keys, mic_key, ...):
    every stream of the step but `step_key`, their parent."""
    return {
        name: fn
        for name, fn in inspect.getmembers(step_inputs, inspect.isfunction)
        if name.endswith(("_key", "_keys"))
        and name != "step_key"
        and list(inspect.signature(fn).parameters) == ["state", "axis_name"]
    }


def _streams(num_devices: int) -> dict[tuple[str, int], tuple[int, ...]]:
    """(stream, device) -> key data, each device an entry of a vmapped 'data' axis; a
    function returning a dict of keys gives one stream per entry."""
    state = types.SimpleNamespace(rng=RNG, step=jnp.int32(STEP))
    functions = _stream_functions()

    def body(_):
        keys = {}
        for name, fn in functions.items():
            out = fn(state, "data")
            keys.update(out if isinstance(out, dict) else {name: out})
        return keys

    keys = jax.vmap(body, axis_name="data")(jnp.arange(num_devices))
    return {
        (name, device): tuple(np.asarray(jax.random.key_data(value[device])).ravel().tolist())
        for name, value in keys.items()
        for device in range(num_devices)
    }


def test_every_stream_is_its_own():
    """All streams (ADAPT_KEYS and every `*_key` / `*_keys` function), on two devices,
    pairwise different."""
    streams = _streams(2)
    assert ("mic_key", 0) in streams and ("jitter_t", 1) in streams
    for (a, key_a), (b, key_b) in itertools.combinations(streams.items(), 2):
        assert key_a != key_b, f"streams {a} and {b} draw the same key"


def test_mic_key_derived_by_hand():
    """Derived here from the threefry primitives: the step key of device 0 is
    fold_in(fold_in(rng, step), 0); the target's colour-jitter key is its split into
    len(ADAPT_KEYS) at the index of 'jitter_t'. MIC's key is none of the split keys."""
    step_key = jax.random.fold_in(jax.random.fold_in(RNG, STEP), 0)
    split = [tuple(np.asarray(k).tolist()) for k in jax.random.split(step_key, 7)]
    streams = _streams(1)
    assert streams[("jitter_t", 0)] == split[1]
    assert streams[("mic_key", 0)] not in split
    # fold_in(k, n) repeats split(k, m)[n] (partitionable threefry): what MIC_STREAM avoids.
    assert tuple(np.asarray(jax.random.fold_in(step_key, 1)).tolist()) == split[1]
