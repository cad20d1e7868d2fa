"""The optimisers: the reference's SGD (docs/method.md §11) and DAFormer's AdamW.

`config.optim.name = 'sgd'`: torch.optim.SGD's update, g <- g + wd * p (kernels only),
buf <- m * buf + g, p <- p - lr * buf, with the reference's warm-up and poly schedule.
`config.optim.name = 'adamw'`: torch.optim.AdamW's update (decoupled weight decay,
p <- p - lr * (adam + wd * p)) with mmcv's poly schedule and linear warm-up, no weight
decay on the encoder's normalisation layers (docs/daformer.md "Optimiser").
Both multiply the learning rate by `head_lr_mult` for `params['head']`.
"""

from __future__ import annotations

import collections.abc
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from wsda_jax import config_lib


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Backbone learning rate per (0-based) step: the schedule of `config.optim.name`."""
    if config.optim.name == "adamw":
        return mmcv_poly_schedule(config)
    return reference_schedule(config)


def reference_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The reference's WarmUpPolyLR: linear warm-up from 0, then polynomial decay.

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


def mmcv_poly_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """mmcv's `poly` policy with `warmup='linear'` (DAFormer's `poly10warm.py`), min_lr 0.

    poly(step) = lr * (1 - step / num_steps)^power (0 from num_steps on), and during the
    warm-up (step < warmup_steps) mmcv scales that decayed rate, not the base rate:
    lr(step) = poly(step) * (1 - (1 - step / warmup_steps) * (1 - warmup_ratio)).
    mmcv's `runner.iter` is 0 at the first update, as `step` here.
    """
    base, num_steps, power = config.optim.lr, config.num_steps, config.optim.power
    warmup, ratio = config.optim.warmup_steps, config.optim.warmup_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        poly = base * jnp.maximum(1.0 - step / num_steps, 0.0) ** power
        poly = jnp.where(step >= num_steps, 0.0, poly)
        if warmup <= 0:
            return poly
        # = 1 - (1 - step / warmup) * (1 - ratio), without float32's cancellation at step 0.
        factor = ratio + (1.0 - ratio) * step / warmup
        return jnp.where(step < warmup, poly * factor, poly)

    return schedule


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


def norm_decay_mask(params):
    """False for the parameters of the backbone's normalisation layers, True elsewhere.

    DAFormer's `paramwise_cfg.custom_keys` `norm=dict(decay_mult=0.0)` is mmcv's name rule:
    a parameter takes the first key (longest first, then alphabetical: pos_block, head,
    norm) that is a substring of its full name. In MiT + DAFormer head the names holding
    'norm' are exactly the encoder's LayerNorms; the head's BatchNorms (`...bn.weight`)
    match 'head' first and keep the weight decay; no parameter holds 'pos_block'. On the
    Flax tree a normalisation layer is a module with a 'scale' parameter (LayerNorm,
    BatchNorm, GroupNorm; dense and conv layers have a 'kernel'), so: no decay for the
    'scale' and 'bias' of such modules under params['backbone'].
    """

    def mark(tree, in_backbone):
        is_norm = in_backbone and "scale" in tree
        return {
            key: mark(value, in_backbone)
            if isinstance(value, collections.abc.Mapping)
            else not is_norm
            for key, value in tree.items()
        }

    return {name: mark(subtree, name == "backbone") for name, subtree in params.items()}


def _adamw(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    b1, b2 = config.optim.betas
    return optax.adamw(
        schedule,
        b1=b1,
        b2=b2,
        eps=1e-8,
        weight_decay=config.optim.weight_decay,
        mask=norm_decay_mask,
    )


def _param_groups(params):
    """Labels every leaf by its top-level subtree: 'backbone' or 'head'."""
    return {name: jax.tree.map(lambda _, n=name: n, subtree) for name, subtree in params.items()}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """`config.optim.name` on params {'backbone': ..., 'head': ...}.

    'sgd': momentum, no Nesterov; weight decay on kernels added to the gradient before
    momentum (as torch SGD). 'adamw': torch AdamW (eps 1e-8), decoupled weight decay
    except on the backbone's normalisation layers (`norm_decay_mask`). The head's
    learning rate is `head_lr_mult` times the backbone's schedule.
    """
    if config.optim.name not in config_lib.OPTIMIZERS:
        raise ValueError(
            f"config.optim.name={config.optim.name!r}: expected one of {config_lib.OPTIMIZERS}"
        )
    schedule = learning_rate_schedule(config)
    mult = config.optim.head_lr_mult
    group = _adamw if config.optim.name == "adamw" else _sgd
    return optax.multi_transform(
        {
            "backbone": group(config, schedule),
            "head": group(config, lambda step: mult * schedule(step)),
        },
        _param_groups,
    )


def set_schedule_step(opt_state: optax.OptState, step: jax.Array) -> optax.OptState:
    """Returns `opt_state` with the learning-rate schedules' step counters set to `step`.

    The reference sets the learning rate from the iteration number, so a skipped
    (non-finite) step still advances the schedule; optax's schedules count applied
    updates instead. Only the schedules' counters: Adam's own `count` (its bias
    correction) stays the number of applied updates, as torch's AdamW state.
    """

    def is_schedule_count(path, _):
        last = path[-1]
        return getattr(last, "tuple_name", None) == "ScaleByScheduleState"

    return optax.tree_utils.tree_set(
        opt_state, is_schedule_count, count=jnp.asarray(step, jnp.int32)
    )


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
