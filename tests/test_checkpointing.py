"""Checkpoint round trips, retention, corrupt-checkpoint fallback and init_from checks."""

import gc
import json
import logging
import os
import re
import signal
import sys
import types

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wsda_jax import checkpoint_recovery, checkpointing, config_lib, errors, parallel


@flax.struct.dataclass
class _State:
    """The fields of the real TrainState that checkpointing touches, at toy sizes."""

    step: jax.Array
    params: dict
    batch_stats: dict
    teacher_params: dict
    teacher_batch_stats: dict
    target_prototypes: jax.Array
    rng: jax.Array


def _state(kernel_shape=(3, 3), seed=0) -> _State:
    key = jax.random.key(seed)
    params = {"backbone": {"conv": {"kernel": jax.random.normal(key, kernel_shape)}}}
    stats = {"backbone": {"bn": {"mean": jnp.arange(3.0) + seed}}}
    return _State(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        batch_stats=stats,
        teacher_params=jax.tree.map(jnp.zeros_like, params),
        teacher_batch_stats=jax.tree.map(jnp.zeros_like, stats),
        target_prototypes=jnp.full((2, 4), float(seed)),
        rng=jax.random.key(seed + 100),
    )


def _iterator():
    return iter(grain.MapDataset.range(50).shuffle(seed=3).to_iter_dataset().batch(2))


def _config(keep=2) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"keep_checkpoints": keep, "seed": 0})


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract_on_mesh(tree, mesh):
    return parallel.abstract_on(tree, parallel.replicated(mesh))


def test_round_trip_restores_state_and_iterator_position(tmp_path):
    config = _config()
    state = _state(seed=7)
    iterator = _iterator()
    next(iterator), next(iterator)
    with checkpointing.make_manager(str(tmp_path), config) as manager:
        assert checkpointing.save(manager, 2, state, iterator, config)
        expected_next = next(iterator)  # Advancing after save must not change what was saved.
        manager.wait_until_finished()
        assert not checkpointing.save(manager, 2, state, iterator, config)  # Already there.

    fresh_iterator = _iterator()
    abstract = _abstract_on_mesh(jax.eval_shape(lambda: _state()), _mesh())
    with checkpointing.make_manager(str(tmp_path), config) as manager:
        restored, step = checkpointing.restore_latest(manager, abstract, fresh_iterator)
    assert step == 2
    _assert_trees_equal(restored, state)
    assert restored.params["backbone"]["conv"]["kernel"].sharding.is_fully_replicated
    np.testing.assert_array_equal(next(fresh_iterator), expected_next)
    assert os.path.exists(tmp_path / "2" / "config")


def test_no_checkpoint_restores_none(tmp_path):
    abstract = jax.eval_shape(lambda: _state())
    with checkpointing.make_manager(str(tmp_path), _config()) as manager:
        assert checkpointing.restore_latest(manager, abstract) is None


def test_keeps_latest_and_best_by_miou(tmp_path):
    config = _config(keep=2)
    state, iterator = _state(), _iterator()
    mious = {1: 0.5, 2: None, 3: 0.9, 4: None, 5: 0.1, 6: None, 7: None}
    with checkpointing.make_manager(str(tmp_path), config) as manager:
        for step, miou in mious.items():
            metrics = None if miou is None else {"miou": miou}
            checkpointing.save(manager, step, state, iterator, config, metrics=metrics)
            manager.wait_until_finished()
        assert manager.best_step() == 3
        assert sorted(manager.all_steps()) == [3, 6, 7]
    assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [3, 6, 7]


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    config = _config(keep=3)
    iterator = _iterator()
    with checkpointing.make_manager(str(tmp_path), config) as manager:
        checkpointing.save(manager, 1, _state(seed=1), iterator, config)
        manager.wait_until_finished()
        checkpointing.save(manager, 2, _state(seed=2), iterator, config)
        manager.wait_until_finished()
    # Simulate a crash that left step 2's array data truncated.
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0")

    abstract = jax.eval_shape(lambda: _state())
    abstract = _abstract_on_mesh(abstract, _mesh())
    with caplog.at_level(logging.WARNING):
        with checkpointing.make_manager(str(tmp_path), config) as manager:
            restored, step = checkpointing.restore_latest(manager, abstract, _iterator())
    assert step == 1
    _assert_trees_equal(restored, _state(seed=1))
    assert any(str(tmp_path / "2") in record.getMessage() for record in caplog.records)


def test_init_from_loads_student_and_teacher(tmp_path):
    config = _config()
    stage1 = _state(seed=5)
    with checkpointing.make_manager(checkpointing.checkpoint_dir(str(tmp_path)), config) as m:
        checkpointing.save(m, 10, stage1, _iterator(), config)
        m.wait_until_finished()

    fresh = _state(seed=0)
    loaded = checkpointing.load_init_from(str(tmp_path), fresh, _mesh())  # The workdir.
    _assert_trees_equal(loaded.params, stage1.params)
    _assert_trees_equal(loaded.batch_stats, stage1.batch_stats)
    # The teacher is the stage-1 EMA teacher (here all zeros), as the reference loads it.
    _assert_trees_equal(loaded.teacher_params, stage1.teacher_params)
    _assert_trees_equal(loaded.teacher_batch_stats, stage1.teacher_batch_stats)
    # teacher='student': a copy of the stage-1 student instead.
    copied = checkpointing.load_init_from(str(tmp_path), _state(seed=0), _mesh(), teacher="student")
    _assert_trees_equal(copied.teacher_params, stage1.params)
    _assert_trees_equal(copied.teacher_batch_stats, stage1.batch_stats)
    # Everything else stays fresh.
    _assert_trees_equal(loaded.target_prototypes, fresh.target_prototypes)
    assert int(loaded.step) == 0
    # The train step donates the state: student and teacher must not share buffers.
    jax.jit(lambda state: state, donate_argnums=0)(loaded)


@pytest.mark.parametrize(
    "model, named",
    [(None, ""), ({"arch": "deeplabv2", "depth": 18, "width": 4}, " (ResNet-18 w4)")],
    ids=["saved_config_without_model", "saved_resnet"],
)
def test_init_from_shape_mismatch_names_parameter(tmp_path, model, named):
    """The first differing parameter, and the checkpoint's network where its saved config
    names one."""
    config = _config()
    if model:
        config.model = model
    with checkpointing.make_manager(str(tmp_path), config) as manager:
        checkpointing.save(manager, 1, _state(kernel_shape=(3, 3)), _iterator(), config)
        manager.wait_until_finished()
    parameter = r"params/backbone/conv/kernel has shape \(3, 3\)"
    expected = f"different model{re.escape(named)}: {parameter}"
    with pytest.raises(ValueError, match=expected) as e:
        checkpointing.load_init_from(str(tmp_path), _state(kernel_shape=(3, 4)), _mesh())
    assert "\n" not in str(e.value)


def test_init_from_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        checkpointing.load_init_from(str(tmp_path / "nope"), _state(), _mesh())


def _save_steps(directory, states, config):
    with checkpointing.make_manager(str(directory), config) as manager:
        for step, state in states.items():
            checkpointing.save(manager, step, state, _iterator(), config)
            manager.wait_until_finished()


def _zero_files(directory):
    """Overwrites every file under `directory` with one zero byte (a crash's leftovers)."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0")


def test_corrupt_latest_is_moved_aside_so_it_is_saved_again(tmp_path, caplog):
    config = _config(keep=3)
    _save_steps(tmp_path, {1: _state(seed=1), 2: _state(seed=2)}, config)
    _zero_files(tmp_path / "2" / "state")
    abstract = _abstract_on_mesh(jax.eval_shape(lambda: _state()), _mesh())
    with caplog.at_level(logging.WARNING):
        with checkpointing.make_manager(str(tmp_path), config) as manager:
            _, step = checkpointing.restore_latest(manager, abstract, _iterator())
            assert step == 1 and manager.all_steps() == [1]
            # The step is written again (the old code skipped it as "already there").
            assert checkpointing.save(manager, 2, _state(seed=3), _iterator(), config)
            manager.wait_until_finished()
    warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(warnings) == 1 and f"moved to {tmp_path / 'corrupt' / '2'}" in warnings[0]
    assert os.listdir(tmp_path / "corrupt") == ["2"]
    with checkpointing.make_manager(str(tmp_path), config) as manager:
        restored, step = checkpointing.restore_latest(manager, abstract)
    assert step == 2
    _assert_trees_equal(restored, _state(seed=3))


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/run/checkpoints/2/state"),
        ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.0GiB"),
        RuntimeError("restore failed"),  # Its cause names the fault.
    ],
)
def test_a_checkpoint_the_machine_cannot_read_now_is_left_in_place(tmp_path, error):
    """No permission, an I/O error, no memory: the checkpoint is not damaged, so it is
    neither moved aside nor skipped for an older one."""
    if isinstance(error, RuntimeError):
        error.__cause__ = OSError(5, "Input/output error")
    config = _config(keep=3)
    _save_steps(tmp_path, {1: _state(seed=1), 2: _state(seed=2)}, config)

    def restore(step):
        raise error

    with checkpointing.make_manager(str(tmp_path), config) as manager:
        with pytest.raises(ValueError, match=f"checkpoint {tmp_path}/2 cannot be read now"):
            checkpoint_recovery.newest_readable(manager, restore, set_aside=True)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_checkpoint_of_another_model_is_named_and_left_in_place(tmp_path):
    config = _config()
    _save_steps(tmp_path, {1: _state(kernel_shape=(3, 3))}, config)
    abstract = _abstract_on_mesh(jax.eval_shape(lambda: _state(kernel_shape=(3, 4))), _mesh())
    expected = (
        "checkpoint 1 was written by a different model: params/backbone/conv/kernel has "
        r"shape \(3, 3\), this config \(3, 4\)"
    )
    with checkpointing.make_manager(str(tmp_path), config) as manager:
        with pytest.raises(checkpointing.DifferentModelError, match=expected):
            checkpointing.restore_latest(manager, abstract)
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_init_from_skips_a_corrupt_latest_without_moving_it(tmp_path, caplog):
    config = _config(keep=3)
    _save_steps(tmp_path, {1: _state(seed=1), 2: _state(seed=2)}, config)
    _zero_files(tmp_path / "2" / "state")
    with caplog.at_level(logging.WARNING):
        loaded = checkpointing.load_init_from(str(tmp_path), _state(seed=0), _mesh())
    _assert_trees_equal(loaded.params, _state(seed=1).params)
    assert any("2 is unreadable" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # Another run's workdir: untouched.


def test_restore_noise_filter_drops_only_the_abandoned_reads_errors():
    seen = []
    noise = checkpoint_recovery._RestoreNoiseFilter()
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: seen.append(unraisable.exc_value)
    try:
        noise.install()
        closed, other = RuntimeError("Event loop is closed"), RuntimeError("a real bug")
        for error in (closed, other):
            sys.unraisablehook(types.SimpleNamespace(exc_value=error, exc_traceback=None))
        noise.remove()
        sys.unraisablehook(types.SimpleNamespace(exc_value=closed, exc_traceback=None))
    finally:
        sys.unraisablehook = previous
    assert seen == [other, closed]  # Dropped only while installed.


def test_with_several_processes_the_watcher_leaves_the_signals_alone(monkeypatch):
    """SIGTERM belongs to the handler jax.distributed.initialize installs (its preemption
    sync point decides when all processes save); a Python handler would replace it."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with checkpointing.PreemptionWatcher():
        assert {signum: signal.getsignal(signum) for signum in before} == before


def test_sigint_is_a_stop_request_like_sigterm():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, else Python's.
    with checkpointing.PreemptionWatcher() as watcher:
        assert watcher.signum is None
        os.kill(os.getpid(), signal.SIGINT)  # No KeyboardInterrupt: the watcher has it.
        assert watcher.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # Restored on exit.


def test_save_to_an_unwritable_directory_fails_at_once(tmp_path):
    config = _config()
    directory = tmp_path / "checkpoints"
    with checkpointing.make_manager(str(directory), config) as manager:
        checkpointing.save(manager, 1, _state(), _iterator(), config)
        manager.wait_until_finished()
        os.rename(directory, tmp_path / "moved")
        (tmp_path / "checkpoints").write_text("")  # Now a file: nothing can be created in it.
        with pytest.raises(errors.CheckpointWriteError, match="cannot write checkpoints"):
            checkpointing.save(manager, 2, _state(), _iterator(), config)


def test_run_difference_names_identity_keys_and_defaults_absent_ones():
    config = config_lib.base_config()
    saved = json.loads(config.to_json())
    assert checkpoint_recovery.run_difference(config, saved) == {}
    saved["stage"] = "source_only"
    saved["model"]["remat"] = "blocks"  # How the model is computed: not compared.
    saved["optim"]["lr"] = 1.0  # Not an identity setting.
    assert checkpoint_recovery.run_difference(config, saved) == {"stage": ("adapt", "source_only")}
    # A key the saved config lacks (older checkpoint) counts as its default.
    saved = json.loads(config.to_json())
    del saved["model"]["depth"]
    assert checkpoint_recovery.run_difference(config, saved) == {}
    config.model.depth = 50
    assert checkpoint_recovery.run_difference(config, saved) == {"model.depth": (50, 101)}


@flax.struct.dataclass
class _StateWithEncoder(_State):
    """_State plus a field that older checkpoints lack (as TrainState.imnet_encoder)."""

    imnet_encoder: dict = flax.struct.field(default_factory=dict)


def test_a_field_added_later_restores_empty_or_filled(tmp_path):
    """A checkpoint written before the field existed restores with the field's empty
    value (and is not moved aside); one written with it filled restores it."""
    config, mesh = _config(), _mesh()
    old, new = tmp_path / "old", tmp_path / "new"
    with checkpointing.make_manager(str(old), config) as manager:
        assert checkpointing.save(manager, 1, _state(seed=3), _iterator(), config)
    abstract = _abstract_on_mesh(jax.eval_shape(lambda: _StateWithEncoder(**vars(_state()))), mesh)
    with checkpointing.make_manager(str(old), config) as manager:
        restored, step = checkpointing.restore_latest(manager, abstract)
    assert step == 1 and restored.imnet_encoder == {}
    _assert_trees_equal(restored, _state(seed=3))
    filled = _StateWithEncoder(**vars(_state(seed=4)), imnet_encoder={"w": jnp.arange(3.0)})
    with checkpointing.make_manager(str(new), config) as manager:
        assert checkpointing.save(manager, 2, filled, _iterator(), config)
    abstract = _abstract_on_mesh(jax.eval_shape(lambda: filled), mesh)
    with checkpointing.make_manager(str(new), config) as manager:
        restored, _ = checkpointing.restore_latest(manager, abstract)
    _assert_trees_equal(restored, filled)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # The discard.
def test_ctrl_c_that_python_discards_during_start_up_still_stops_the_run():
    """Python discards a KeyboardInterrupt raised in a garbage-collector callback; the
    handler installed at the command's start (`cli_errors.run_reporting_errors`) keeps
    the signal for the train loop's watcher."""
    recorder = errors.SignalRecorder()
    previous = signal.signal(signal.SIGINT, recorder)

    def interrupt_inside_gc(phase, info):
        del info
        if phase == "start":
            gc.callbacks.remove(interrupt_inside_gc)
            signal.raise_signal(signal.SIGINT)  # Its KeyboardInterrupt is discarded.

    try:
        gc.callbacks.append(interrupt_inside_gc)
        gc.collect()  # Returns normally.
        assert recorder.received == signal.SIGINT
        with checkpointing.PreemptionWatcher() as watcher:
            assert watcher.requested and watcher.signum == signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, previous)


def test_evaluating_on_another_dataset_is_the_same_model():
    config = config_lib.base_config()
    saved = json.loads(config.to_json())
    saved["data"]["target"] = "synthetic_target"
    keys = checkpoint_recovery.INFERENCE_IDENTITY
    assert checkpoint_recovery.run_difference(config, saved, keys) == {}
    assert set(checkpoint_recovery.run_difference(config, saved)) == {"data.target"}
