"""The training loop, and the eval / predict modes that restore its checkpoints.

`train_and_evaluate(config, workdir)` reads as a sequence of named helpers: open the
data, build the model and step, restore or initialise the state, then loop: dispatch a
step, report the previous one, evaluate every `config.eval.every_steps`, checkpoint every
`config.checkpoint_every_steps` (and at every evaluation, ranked by mIoU), save and stop
cleanly on SIGTERM or SIGINT (then raise `errors.Interrupted`). The step functions themselves
live in `steps.py`.

Stage: 'adapt' runs `steps.adapt_step`; 'source_only' runs `steps.source_only_step` on
the source; 'oracle' runs `steps.source_only_step` with the target's train split (and
its fine labels) as the source.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from wsda_jax import (
    checkpointing,
    config_lib,
    errors,
    evaluation,
    feature_distance,
    optim,
    parallel,
    prediction,
    reporting,
    steps,
    train_state,
)
from wsda_jax.data import eval_pipeline, pipeline, sources
from wsda_jax.models import deeplab, imagenet_init


def _process_kwargs() -> dict[str, int]:
    """This host's place among the hosts, and its devices (batches are per device)."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "num_local_devices": jax.local_device_count(),
    }


def _from_imagenet(
    state: train_state.TrainState, path: str, mesh: jax.sharding.Mesh, arch: str
) -> train_state.TrainState:
    """Student and teacher backbones from ImageNet weights: a torchvision ResNet
    ('deeplabv2') or an NVlabs MiT ('daformer')."""
    try:
        variables = imagenet_init.init_from_imagenet(
            jax.device_get(state.student_variables()), path, arch
        )
    except ValueError as error:
        raise ValueError(f"config.init.imagenet={path!r}: {error}") from error
    variables = parallel.replicate(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]}, mesh
    )
    return train_state.with_student_and_teacher(
        state, variables["params"], variables["batch_stats"]
    )


def _with_frozen_encoder(
    config: ml_collections.ConfigDict, state: train_state.TrainState, mesh: jax.sharding.Mesh
) -> train_state.TrainState:
    """With config.loss.imnet_fd > 0: `state` with `imnet_encoder` the encoder of
    config.init.imagenet (the student's, when it was just initialised from it; set, as
    `_check_fresh_start` makes sure)."""
    if config.loss.imnet_fd <= 0:
        return state
    imagenet = state
    if config.init.init_from:  # The student came from a checkpoint: read the weights.
        imagenet = _from_imagenet(state, config.init.imagenet, mesh, config.model.arch)
        logging.info(
            "Read the frozen encoder of the feature distance from %s.", config.init.imagenet
        )
    encoder = feature_distance.encoder_variables(imagenet.params, imagenet.batch_stats)
    return state.replace(imnet_encoder=encoder)


def _check_fresh_start(config: ml_collections.ConfigDict) -> None:
    """For a fresh run, before the state initialiser compiles (minutes for MiT-B5 on a
    CPU): a one-line ValueError for a config.init.init_from without checkpoints, a
    missing config.init.imagenet file, or a feature distance without ImageNet weights;
    a warning for ImageNet weights that nothing reads."""
    init = config.init
    if config.loss.imnet_fd > 0 and not init.imagenet:
        raise ValueError(
            f"config.loss.imnet_fd={config.loss.imnet_fd} needs the ImageNet weights its "
            "frozen encoder copies: set config.init.imagenet (or config.loss.imnet_fd=0)"
        )
    if init.init_from:
        checkpointing.init_dir(init.init_from)
    if init.imagenet and init.init_from and config.loss.imnet_fd <= 0:
        logging.warning(
            "config.init.imagenet=%r is not read: student and teacher come from "
            "config.init.init_from, and config.loss.imnet_fd is 0.",
            init.imagenet,
        )
    elif init.imagenet:
        try:
            imagenet_init.check_weights_path(init.imagenet)
        except ValueError as error:
            raise ValueError(f"config.init.imagenet={init.imagenet!r}: {error}") from error


def initial_state(
    config: ml_collections.ConfigDict,
    model: Any,
    optimizer: Any,
    mesh: jax.sharding.Mesh,
    manager: Any,
    train_iter: Any,
) -> tuple[train_state.TrainState, int]:
    """The state to start from, and its step."""
    # Resume order:
    # (1) the latest readable checkpoint in the workdir (state and data position);
    key = jax.random.PRNGKey(config.seed)
    init = train_state.state_initializer(config, model, optimizer=optimizer, mesh=mesh)
    restored = _restore_latest(manager, train_state.abstract_state(init, key, mesh), train_iter)
    if restored is not None:
        logging.info("Resuming from step %d of %s.", restored[1], manager.directory)
        return restored
    checkpointing.check_nothing_set_aside(str(manager.directory))
    _check_fresh_start(config)
    state = init(key)  # Traced once, for the abstract state above.
    # (2) a stage-1 checkpoint (config.init.init_from) for student and teacher;
    if config.init.init_from:
        state = checkpointing.load_init_from(
            config.init.init_from, state, mesh, teacher=config.init.teacher
        )
    # (3) ImageNet weights for the backbones (config.init.imagenet);
    elif config.init.imagenet:
        state = _from_imagenet(state, config.init.imagenet, mesh, config.model.arch)
        logging.info("Initialised student and teacher backbones from %s.", config.init.imagenet)
    # (4) scratch. (A one-stage run, config.init.one_stage, starts from (3) or (4).)
    else:
        logging.info("Training from scratch (no checkpoint, init_from or imagenet weights).")
    # Then the feature distance's frozen ImageNet encoder (config.loss.imnet_fd).
    return _with_frozen_encoder(config, state, mesh), 0


def _restore_latest(
    manager: Any, abstract: Any, train_iter: Any = None, *, set_aside: bool = True
) -> tuple[train_state.TrainState, int] | None:
    """`checkpointing.restore_latest`, naming the folder when its checkpoints are of
    another model."""
    try:
        return checkpointing.restore_latest(manager, abstract, train_iter, set_aside=set_aside)
    except checkpointing.DifferentModelError as error:
        raise ValueError(
            f"{manager.directory}: {error} (use another --workdir for this config)"
        ) from error


def make_train_step(
    config: ml_collections.ConfigDict, model: Any, optimizer: Any, mesh: jax.sharding.Mesh
) -> Callable[[Any, Any, int], tuple[Any, dict[str, jax.Array]]]:
    """The jitted, sharded step of the configured stage: fn(state, batch, step), where
    `step` is the host's count of steps done (= state.step).

    Adaptation has two programs: before `config.loss.contrast_start` without the
    contrastive and image-level losses (not computed, rather than multiplied by 0), and
    from it with them; `step` picks one on the host. Each compiles on first use.
    """
    kwargs = dict(model=model, optimizer=optimizer, config=config)
    if config.stage != "adapt":
        source_only = parallel.shard_train_step(steps.source_only_step, mesh, **kwargs)
        return lambda state, batch, step: source_only(state, batch)
    programs = {
        on: parallel.shard_train_step(steps.adapt_step, mesh, contrast_on=on, **kwargs)
        for on in (False, True)
    }
    return lambda state, batch, step: programs[step >= config.loss.contrast_start](state, batch)


def evaluate_and_report(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int,
    state: train_state.TrainState,
    val_records: Sequence[Any],
    *,
    model: Any,
    mesh: jax.sharding.Mesh,
    eval_fn: Callable[[Any, Any], jax.Array],
    file_name: str | None = None,
) -> dict[str, Any]:
    """Evaluates the student (and, when adapting, the teacher); writes DIR/eval/NAME.*
    (NAME: `file_name`, default STEP)."""
    models = {"student": state.student_variables()}
    if config.stage == "adapt":
        models["teacher"] = state.teacher_variables()
    iterator = eval_pipeline.make_eval_iterator(config, val_records, **_process_kwargs())
    confusions, examples = evaluation.evaluate(
        config, models, iterator, model=model, mesh=mesh, eval_fn=eval_fn
    )
    results = {}
    for name, variables in models.items():
        predictions = None
        if examples and jax.process_index() == 0:  # Only process 0 writes the panels.
            images = np.stack([example["image"] for example in examples])
            predictions = evaluation.predict_labels(config, variables, images, model=model)
        results[name] = (confusions[name], predictions)
    report = evaluation.write_report(config, workdir, step, results, examples, name=file_name)
    logging.info("Evaluation at step %d: target val mIoU (%%) %s.", step, report_scores(report))
    return report


def _eval_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The report's finite mIoUs, named 'eval/MODEL_miou...' for the logs."""
    return {
        f"eval/{name}_{key}": value
        for name, summary in report.items()
        if isinstance(summary, dict)
        for key, value in summary.items()
        if key.startswith("miou") and value is not None
    }


def _best_metric(report: dict[str, Any]) -> dict[str, float]:
    """The checkpoint ranking metric: the better of student and teacher mIoU."""
    mious = [
        s["miou"] for s in report.values() if isinstance(s, dict) and s.get("miou") is not None
    ]
    return {checkpointing.BEST_METRIC: max(mious, default=0.0)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config.num_steps` steps in `workdir` (resuming if possible); returns the
    final evaluation report. Raises `errors.Interrupted` after saving when SIGTERM or SIGINT
    stopped the run early."""
    config_lib.validate(config, jax.device_count())
    checkpointing.check_same_run(config, workdir)  # Before anything there is touched.
    logging.info(config_lib.batch_summary(config, jax.device_count()))
    mesh = parallel.make_mesh()
    model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
    eval_model = deeplab.build_model(config)
    optimizer = optim.make_optimizer(config)
    data = sources.open_datasets(config)
    train_iter = pipeline.make_train_iterator(
        config,
        data.source,
        data.target,
        source_class_pixels=sources.source_class_pixels(config, data.source),
        **_process_kwargs(),
    )
    manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir), config)
    state, step = initial_state(config, model, optimizer, mesh, manager, train_iter)
    train_step = make_train_step(config, model, optimizer, mesh)
    eval_fn = evaluation.make_eval_fn(config, eval_model, mesh)
    evaluate = lambda step, state: evaluate_and_report(
        config, workdir, step, state, data.val, model=eval_model, mesh=mesh, eval_fn=eval_fn
    )
    reporter = reporting.Reporter(
        workdir,
        num_steps=config.num_steps,
        initial_step=step,
        log_every_steps=config.log_every_steps,
        images_per_step=config_lib.global_batch_size(config, jax.device_count())
        * (2 if config.stage == "adapt" else 1),
    )
    profiler = reporting.Profiler(workdir, config.profile.start_step, config.profile.num_steps)
    report, stopped_by = None, None
    if step == 0 and config.init.init_from:
        # The starting point's score, so that eval/0.json shows what adaptation gained.
        evaluate(0, state)
    with checkpointing.PreemptionWatcher() as watcher, checkpointing.disk_errors(manager):
        while step < config.num_steps:
            batch = parallel.put_batch(next(train_iter), mesh)
            profiler.before_step(step)
            # The step never touches the host; an implicit transfer (a stray NumPy
            # input, a resharding copy) raises here instead of slowing every step.
            with jax.transfer_guard("disallow"):
                state, step_metrics = train_step(state, batch, step)
            step += 1
            profiler.after_step(step, state)
            reporter.update(step, step_metrics)
            last = step == config.num_steps
            metrics = None
            if step % config.eval.every_steps == 0 or last:
                reporter.flush()
                report = evaluate(step, state)
                reporter.write_scalars(step, _eval_scalars(report))
                reporter.write_eval_images(step, os.path.join(workdir, "eval"))
                metrics = _best_metric(report)
            stop = watcher.should_stop(manager, step)
            if metrics or stop or step % config.checkpoint_every_steps == 0:
                # metrics.jsonl first: a crash after the save must not lose this step's line.
                reporter.flush()
                checkpointing.save(manager, step, state, train_iter, config, metrics=metrics)
            if stop:
                stopped_by = watcher.signum or signal.SIGTERM  # Several processes: SIGTERM.
                break
    if report is None and step >= config.num_steps:  # Resumed an already finished run.
        report = evaluate(step, state)
    reporter.close()
    checkpointing.wait_until_finished(manager)
    manager.close()
    train_iter.close()  # Stops the data workers and frees their shared memory.
    if stopped_by is not None and step < config.num_steps:
        raise errors.Interrupted(stopped_by, step)
    return report


def progress_summary(workdir: str) -> str:
    """One line: target-val mIoU of the first and the last evaluation in `workdir`.

    For a stage-2 run the first one is step 0, the stage-1 model before adaptation.
    """
    directory = os.path.join(workdir, "eval")
    steps_done = (
        sorted(int(name[:-5]) for name in os.listdir(directory) if name[:-5].isdigit())
        if os.path.isdir(directory)
        else []
    )
    if not steps_done:
        return "No evaluation was written."

    def scores(step: int) -> str:
        path = os.path.join(directory, f"{step}.json")
        try:
            with open(path) as f:
                return report_scores(json.load(f))
        except (OSError, ValueError, AttributeError, TypeError) as error:  # Damaged.
            logging.warning("Unreadable evaluation report %s (%s).", path, error)
            return "report unreadable"

    first, last = steps_done[0], steps_done[-1]
    if first == last:
        return f"Target val mIoU (%) at step {last}: {scores(last)}."
    return f"Target val mIoU (%): step {first}: {scores(first)}; step {last}: {scores(last)}."


def report_scores(report: dict[str, Any]) -> str:
    """'student 39.7, teacher 40.9': the mIoUs (%) of an evaluation report."""
    return ", ".join(
        f"{name} {100 * summary['miou']:.1f}"
        for name, summary in report.items()
        if isinstance(summary, dict) and summary.get("miou") is not None
    )


def _restore_for_inference(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, *, set_aside: bool
) -> tuple[train_state.TrainState, int]:
    """The latest readable checkpoint of `workdir`, for the eval and predict modes
    (unreadable ones are moved aside when `set_aside`, as training does)."""
    model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
    optimizer = optim.make_optimizer(config)
    directory = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise ValueError(f"--workdir={workdir}: no checkpoints in {directory}; train first")
    checkpointing.check_same_run(config, workdir, inference=True)
    with checkpointing.make_manager(directory, config, owner=set_aside) as manager:
        abstract = train_state.create_train_state(
            config,
            model,
            jax.random.PRNGKey(config.seed),
            optimizer=optimizer,
            mesh=mesh,
            abstract=True,
        )
        restored = _restore_latest(manager, abstract, set_aside=set_aside)
    if restored is None:
        raise ValueError(f"--workdir={workdir}: no checkpoints in {directory}; train first")
    return restored


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the latest checkpoint of `workdir`; writes DIR/eval/STEP.json, or
    DIR/eval/STEP_TAG.json when the eval settings differ from those the checkpoint was
    trained with (`evaluation.report_name`)."""
    config_lib.validate(config, jax.device_count())
    mesh = parallel.make_mesh()
    state, step = _restore_for_inference(config, workdir, mesh, set_aside=True)
    trained = checkpointing.saved_config(checkpointing.checkpoint_dir(workdir), step)
    name = evaluation.report_name(
        evaluation.eval_settings(config),
        evaluation.eval_settings(ml_collections.ConfigDict(trained)) if trained else {},
        step,
    )
    model = deeplab.build_model(config)
    val = sources.open_val(config)
    eval_fn = evaluation.make_eval_fn(config, model, mesh)
    previous = os.path.join(workdir, "eval", f"{name}.json")
    if os.path.exists(previous) and jax.process_index() == 0:
        logging.warning("Replacing the earlier evaluation %s (and its PNGs).", previous)
    report = evaluate_and_report(
        config, workdir, step, state, val, model=model, mesh=mesh, eval_fn=eval_fn, file_name=name
    )
    if jax.process_index() == 0:
        print(f"Target val mIoU (%) at step {step}: {report_scores(report)} (eval/{name}.json).")
    return report


def predict_images(
    config: ml_collections.ConfigDict, workdir: str, input_dir: str, output_dir: str
) -> list[str]:
    """Colourised predictions of the images in `input_dir` by the latest checkpoint
    (the EMA teacher when adapting, else the student); returns the written paths."""
    prediction.check_predict_dirs(input_dir, output_dir)  # Before any work.
    mesh = parallel.make_mesh()
    # Read only: predict writes nothing in the workdir (and takes no lock on it).
    state, step = _restore_for_inference(config, workdir, mesh, set_aside=False)
    which = "teacher" if config.stage == "adapt" else "student"
    variables = state.teacher_variables() if which == "teacher" else state.student_variables()
    logging.info("Predicting with the %s of checkpoint %d of %s.", which, step, workdir)
    model = deeplab.build_model(config)
    return prediction.predict_directory(config, variables, input_dir, output_dir, model=model)
