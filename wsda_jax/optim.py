"""SGD with the reference's schedule, weight decay and 10x head learning rate (docs/method.md §11).

The update is torch.optim.SGD's: g <- g + wd * p (kernels only), buf <- m * buf + g,
p <- p - lr * buf, with lr multiplied by `head_lr_mult` for `params['head']`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Backbone learning rate per step: linear warm-up from 0, then polynomial decay.

    lr(step) = lr * step / warmup_steps            for step < warmup_steps,
               lr * (1 - step / num_steps)^power   afterwards (0 from num_steps on).

    Built from optax's schedules: `join_schedules` hands the decay `step - warmup_steps`,
    so the decay starts at lr * (1 - warmup_steps / num_steps)^power and reaches 0 after
    num_steps - warmup_steps more steps, which is the formula above in `step`.
    """
    base = config.optim.lr
    warmup = config.optim.warmup_steps
    num_steps = config.num_steps
    power = config.optim.power
    if warmup <= 0:
        return optax.polynomial_schedule(base, 0.0, power, num_steps)
    remaining = num_steps - warmup
    if remaining <= 0:  # Warm-up to the end: the decay part is never reached with lr > 0.
        decay = optax.constant_schedule(0.0)
    else:
        start = base * (remaining / num_steps) ** power
        decay = optax.polynomial_schedule(start, 0.0, power, remaining)
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), decay], [warmup])


def _decay_mask(params):
    """True for conv/dense kernels (leaves named 'kernel'), False for biases and BN scales."""

    def is_kernel(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def _sgd(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay, mask=_decay_mask),
        optax.trace(decay=config.optim.momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule),
    )


def _param_groups(params):
    """Labels every leaf by its top-level subtree: 'backbone' or 'head'."""
    return {name: jax.tree.map(lambda _, n=name: n, subtree) for name, subtree in params.items()}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD (momentum, no Nesterov) on params {'backbone': ..., 'head': ...}.

    Weight decay on kernels is added to the gradient before momentum (as torch SGD);
    the head's learning rate is `head_lr_mult` times the backbone's schedule.
    """
    schedule = learning_rate_schedule(config)
    mult = config.optim.head_lr_mult
    return optax.multi_transform(
        {
            "backbone": _sgd(config, schedule),
            "head": _sgd(config, lambda step: mult * schedule(step)),
        },
        _param_groups,
    )


def set_schedule_step(opt_state: optax.OptState, step: jax.Array) -> optax.OptState:
    """Returns `opt_state` with the learning-rate schedules' step counters set to `step`.

    The reference sets the learning rate from the iteration number, so a skipped
    (non-finite) step still advances the schedule; optax's schedules count applied
    updates instead. The optimizer of `make_optimizer` has no other `count` fields.
    """
    return optax.tree_utils.tree_set(opt_state, count=jnp.asarray(step, jnp.int32))


def guarded_update(
    state: Any,
    grads: Any,
    loss: jax.Array,
    optimizer: optax.GradientTransformation,
    new_values: dict[str, Any],
) -> tuple[Any, jax.Array]:
    """The optimizer step on a TrainState, guarded against a non-finite loss or gradient
    (docs/method.md §4.12).

    If the loss or any gradient is not finite, params, the momentum and the fields in
    `new_values` (batch_stats, prototypes) keep their old values and skipped_steps += 1,
    while the learning-rate schedule still follows `step`; jnp.where over the trees
    keeps it one compiled program. Returns (state, grad_norm).
    """
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    fields = {name: keep(value, getattr(state, name)) for name, value in new_values.items()}
    # A skipped step keeps the momentum but still advances the schedule, as the reference.
    opt_state = set_schedule_step(keep(opt_state, state.opt_state), state.step + 1)
    state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=opt_state,
        skipped_steps=state.skipped_steps + jnp.where(ok, 0, 1).astype(jnp.int32),
        **fields,
    )
    return state, grad_norm
