"""The EMA teacher (docs/method.md §4.1).

At the start of every step each parameter AND BatchNorm statistic of the teacher becomes
`a * teacher + (1 - a) * student`, with a = config.ema.decay (0.999), or with
config.ema.ramp the reference's other mode `a = min(1 - 1/(step + 1), decay)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from wsda_jax.train_state import TrainState


def ema_decay(step: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """Teacher EMA factor a: config.ema.decay, or min(1 - 1/(step+1), decay) with the ramp."""
    decay = jnp.float32(config.ema.decay)
    if config.ema.ramp:
        decay = jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), decay)
    return decay


def ema_update(state: TrainState, config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """Teacher <- a * teacher + (1 - a) * student, for parameters AND BatchNorm statistics."""
    step_size = 1.0 - ema_decay(state.step, config)
    params = optax.incremental_update(state.params, state.teacher_params, step_size)
    batch_stats = optax.incremental_update(state.batch_stats, state.teacher_batch_stats, step_size)
    return params, batch_stats
