"""The train state: one pytree with student, teacher, optimizer state and prototypes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from wsda_jax import feature_distance, optim, parallel


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes (docs/method.md §4 and 7).

    step: int32 [], steps taken (skipped ones included).
    params, batch_stats: the student's variables ({'backbone', 'head'}, {'backbone'}).
    opt_state: the optimizer state of `optim.make_optimizer`.
    teacher_params, teacher_batch_stats: the EMA teacher.
    source_prototypes, target_prototypes: float32 [C, D], zero-initialised.
    rng: uint32 [2] base PRNG key; each step folds in the step and the device index,
      so it is never split and carried, and a resumed run replays the same randomness.
    skipped_steps: int32 [], steps whose loss or gradient was not finite.
    imnet_encoder: Flax variables {'params': {'backbone'}, ('batch_stats': {'backbone'})}
      of the frozen ImageNet-initialised encoder, with config.loss.imnet_fd > 0
      (`feature_distance`); never trained, not in the optimizer. {} otherwise, so that
      checkpoints without the field restore (`checkpointing.restore_latest`).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    teacher_params: Any
    teacher_batch_stats: Any
    source_prototypes: jax.Array
    target_prototypes: jax.Array
    rng: jax.Array
    skipped_steps: jax.Array
    imnet_encoder: Any = flax.struct.field(default_factory=dict)

    def student_variables(self) -> dict[str, Any]:
        """Flax variables of the student, for `model.apply`."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def teacher_variables(self) -> dict[str, Any]:
        """Flax variables of the EMA teacher, for `model.apply`."""
        return {"params": self.teacher_params, "batch_stats": self.teacher_batch_stats}


def init_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """The dummy input batch that initialises the model: (1, crop height, crop width, 3)."""
    return (1, *config.data.crop_size, 3)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    key: jax.Array,
    image_shape: tuple[int, ...] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    abstract: bool = False,
) -> TrainState:
    """Initialises the student from `key`; the teacher starts equal to the student.

    One jitted program builds the whole state (`state_initializer`), replicated on `mesh`
    when given (placed there directly, never on one device first). With `abstract=True`
    nothing is computed: the result holds `jax.ShapeDtypeStruct`s (with the mesh's
    sharding), the target of a checkpoint restore or of an ahead-of-time compile.

    Args:
      config: the run configuration (num_classes, model.proj_dim, optim).
      model: the `DeepLabV2` to initialise.
      key: uint32 [2] PRNG key (jax.random.PRNGKey); split into init and step keys.
      image_shape: shape of a dummy input batch, (B, H, W, 3); default
        `init_image_shape(config)`.
      optimizer: defaults to `optim.make_optimizer(config)`.
    """
    init = state_initializer(config, model, image_shape, optimizer, mesh=mesh)
    return abstract_state(init, key, mesh) if abstract else init(key)


def state_initializer(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    image_shape: tuple[int, ...] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[jax.Array], TrainState]:
    """The jitted program key -> step-0 state of `create_train_state`. Its abstract state
    (`abstract_state`) and its call share one trace: a run that finds no checkpoint to
    restore builds the state without tracing the model's initialisation again."""
    if optimizer is None:
        optimizer = optim.make_optimizer(config)
    if image_shape is None:
        image_shape = init_image_shape(config)
    return jax.jit(
        functools.partial(_init_state, config, model, image_shape=image_shape, optimizer=optimizer),
        out_shardings=None if mesh is None else parallel.replicated(mesh),
    )


def abstract_state(
    init: Callable[[jax.Array], TrainState], key: jax.Array, mesh: jax.sharding.Mesh | None = None
) -> TrainState:
    """The `jax.ShapeDtypeStruct`s of `init(key)` (replicated on `mesh` when given)."""
    shapes = jax.eval_shape(init, key)
    return shapes if mesh is None else parallel.abstract_on(shapes, parallel.replicated(mesh))


def _init_state(config, model, key, *, image_shape, optimizer) -> TrainState:
    init_key, step_key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros(image_shape, jnp.float32), train=False)
    params = variables["params"]
    return fresh_state(config, params, variables["batch_stats"], optimizer.init(params), step_key)


def fresh_state(
    config: ml_collections.ConfigDict,
    params: Any,
    batch_stats: Any,
    opt_state: Any,
    rng: jax.Array,
) -> TrainState:
    """The state at step 0 of a student with these variables: the teacher a copy, the
    prototypes zero, and with config.loss.imnet_fd > 0 the frozen encoder a copy (its
    values are set from config.init.imagenet at the start, `train.initial_state`)."""
    prototypes = jnp.zeros((config.num_classes, config.model.proj_dim), jnp.float32)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        source_prototypes=prototypes,
        target_prototypes=jnp.copy(prototypes),  # Distinct buffers: the state is donated.
        rng=rng,
        skipped_steps=jnp.zeros((), jnp.int32),
        imnet_encoder=feature_distance.encoder_variables(params, batch_stats)
        if config.loss.imnet_fd > 0
        else {},
    )


def with_student_and_teacher(state: TrainState, params: Any, batch_stats: Any) -> TrainState:
    """`state` with these variables for the student and a copy for the teacher.

    The copy matters: the train step donates the state, and one buffer cannot be donated
    twice.
    """
    return state.replace(
        params=params,
        batch_stats=batch_stats,
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
    )
