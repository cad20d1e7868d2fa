"""Exact resumption in subprocesses, on the tiny synthetic config.

- SIGKILL while 2 grain workers read, restart with none: the same metrics.
- SIGTERM on 4 simulated devices: a checkpoint of the current step, exit status 143 and
  the command that resumes; the run then restores and finishes on 1 device.
- SIGINT (Ctrl-C): saved like SIGTERM, exit status 130, no traceback.
- SIGKILLs in a row at start-up, during a checkpoint write and after a step (five with
  `-m extended`), then a restart from the last checkpoint: every step's metrics and the
  evaluation equal an uninterrupted run's, metrics.jsonl holds each step once, and
  checkpoints/ holds only readable steps.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import subprocesses

# A fresh process is the point here (see pyproject's `slow` marker).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checkpoint every step so the interruption lands mid-run; evaluate only at the end.
ARGS = [
    "--config=configs/synthetic_coarse.py:tiny",
    "--config.checkpoint_every_steps=1",
    "--config.keep_checkpoints=10",
]


def _command(base, workdir, extra=()):
    return [
        sys.executable,
        "-m",
        "wsda_jax.main",
        *ARGS,
        f"--config.data.data_dir={base / 'data'}",
        f"--workdir={workdir}",
        *extra,
    ]


def _start(base, workdir, devices=1, extra=()):
    return subprocess.Popen(
        _command(base, workdir, extra),
        cwd=ROOT,
        env=subprocesses.jax_env(base, devices),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(base, workdir, devices=1):
    result = subprocess.run(
        _command(base, workdir),
        cwd=ROOT,
        env=subprocesses.jax_env(base, devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _interrupt_after_first_checkpoint(base, workdir, sig, devices=1, extra=()):
    """Starts a run, sends `sig` once checkpoint 1 is committed; returns (rc, stderr)."""
    process = _start(base, workdir, devices, extra)
    deadline = time.monotonic() + 600
    # Orbax renames a finished checkpoint into place, so the directory means committed.
    while not (workdir / "checkpoints" / "1").is_dir():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def _train_lines(workdir):
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [line for line in lines if "total" in line]


def _train_metrics(workdir):
    """Step -> metrics (a resumed run drops the lines past its restored step first)."""
    metrics = {}
    for entry in _train_lines(workdir):
        entry.pop("images_per_sec")
        metrics[entry.pop("step")] = entry
    return metrics


def _steps(workdir):
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


@pytest.fixture
def reference(tiny_cli_run):
    """An uninterrupted run's workdir: the session's CLI run (conftest.py), which
    checkpoints at steps 2 and 4 only; the metrics and evaluation do not depend on that."""
    assert sorted(_train_metrics(tiny_cli_run)) == [1, 2, 3, 4]
    return tiny_cli_run


@pytest.mark.extended
def test_restart_with_another_worker_count_matches_uninterrupted_run(
    reference, tmp_path, tmp_path_factory
):
    """Killed while 2 grain worker processes read, resumed with none (a new host with
    fewer cores picks another automatic count): the same batches, the same metrics."""
    base = tmp_path_factory.getbasetemp()
    interrupted = tmp_path / "interrupted"
    returncode, _ = _interrupt_after_first_checkpoint(
        base, interrupted, signal.SIGKILL, extra=["--config.data.num_workers=2"]
    )
    assert returncode == -signal.SIGKILL
    killed_at = _steps(interrupted)[-1]
    resumed = _run(base, interrupted)
    assert f"Resuming from step {killed_at}" in resumed.stderr
    assert not (interrupted / "checkpoints" / "corrupt").exists()
    metrics, expected = _train_metrics(interrupted), _train_metrics(reference)
    for step in expected:
        assert metrics[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step


def test_sigterm_on_four_devices_saves_and_resumes_on_one(tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path / "run"
    returncode, stderr = _interrupt_after_first_checkpoint(base, workdir, signal.SIGTERM, devices=4)
    assert returncode == 128 + signal.SIGTERM, stderr[-4000:]  # `stage1 && stage2` stops.
    assert "CpuDevice(id=3)" in stderr  # main logs the devices: really 4 of them.
    logged = max(_train_metrics(workdir))
    saved = _steps(workdir)[-1]
    assert saved == logged < 4  # The step being trained when the signal came.
    assert f"Interrupted by SIGTERM at step {saved}; its checkpoint is saved." in stderr
    assert f"Resume with: python -m wsda_jax.main {ARGS[0]}" in stderr

    resumed = _run(base, workdir, devices=1)
    assert "CpuDevice(id=1)" not in resumed.stderr
    assert f"Resuming from step {saved}" in resumed.stderr
    assert max(_train_metrics(workdir)) == 4
    assert json.load(open(workdir / "eval" / "4.json"))["step"] == 4


@pytest.mark.extended  # The default run: SIGINT at start-up (test_faults), in process
# (test_checkpointing's watcher) and SIGTERM mid-run; one watcher serves both signals.
def test_sigint_saves_and_exits_like_sigterm(tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path / "run"
    returncode, stderr = _interrupt_after_first_checkpoint(base, workdir, signal.SIGINT)
    assert returncode == 128 + signal.SIGINT, stderr[-4000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-4000:]
    assert len([line for line in stderr.splitlines() if "Received SIGINT" in line]) == 1
    saved = _steps(workdir)[-1]
    assert saved == max(_train_metrics(workdir)) < 4
    assert f"Interrupted by SIGINT at step {saved}" in stderr
    assert not (workdir / "lock").exists()


def _wait_for(process, condition, what, timeout=300):
    """Polls `condition()` every 5 ms while the run goes on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _writing_checkpoint(workdir):
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(".orbax-checkpoint-tmp" in n for n in os.listdir(directory))


def _logged_steps(workdir):
    try:
        return len(_train_lines(workdir))
    except (FileNotFoundError, json.JSONDecodeError):  # Not yet, or a line half written.
        return 0


def _kill_at(point, process, workdir, rng):
    """SIGKILLs the run at `point`: 'start' (a random moment of start-up), 'write' (while
    a checkpoint is being written), 'step' (a random moment after its next logged step)."""
    if point == "start":
        time.sleep(rng.uniform(0.5, 4.0))
    elif point == "write":
        # A killed write's leftover folder is removed when the run opens its checkpoints.
        _wait_for(process, lambda: not _writing_checkpoint(workdir), "the leftovers' removal")
        _wait_for(process, lambda: _writing_checkpoint(workdir), "a checkpoint write")
    else:
        logged = _logged_steps(workdir)
        _wait_for(process, lambda: _logged_steps(workdir) > logged, "a new step")
        time.sleep(rng.uniform(0.0, 0.3))
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


def _assert_every_checkpoint_restores(workdir):
    """Every entry of checkpoints/ is a step whose state restores (nothing else left)."""
    import jax

    from wsda_jax import checkpointing, config_presets, optim, parallel, train_state
    from wsda_jax.models import deeplab

    names = os.listdir(workdir / "checkpoints")
    assert names and all(name.isdigit() for name in names), names
    config = config_presets.synthetic(stage="adapt", weak_label="coarse", arg="tiny")
    mesh = parallel.make_mesh()
    model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
    abstract = train_state.create_train_state(
        config,
        model,
        jax.random.PRNGKey(0),
        optimizer=optim.make_optimizer(config),
        mesh=mesh,
        abstract=True,
    )
    with checkpointing.make_manager(str(workdir / "checkpoints"), config) as manager:
        for step in sorted(int(name) for name in names):
            args = checkpointing.ocp.args.Composite(
                state=checkpointing.ocp.args.StandardRestore(abstract)
            )
            state = manager.restore(step, args=args).state
            assert int(jax.device_get(state.step)) == step


@pytest.mark.parametrize(
    "points",
    [
        ("start", "write", "step"),
        pytest.param(("start", "write", "step", "write", "step"), marks=pytest.mark.extended),
    ],
    ids=["start_write_step", "five"],
)
def test_random_kills_then_matches_uninterrupted_run(points, reference, tmp_path, tmp_path_factory):
    """SIGKILL at each point in turn (start-up, a checkpoint write, after a step), then an
    uninterrupted run: the same metrics and evaluation as the run never killed, and every
    checkpoint left restores."""
    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path / "run"
    seed = 0
    rng = random.Random(seed)
    for point in points:
        process = _start(base, workdir)
        _kill_at(point, process, workdir, rng)
        assert process.returncode == -signal.SIGKILL, point
    # The last committed checkpoint (none if the kill after a step came before it).
    saved = _steps(workdir) if (workdir / "checkpoints").is_dir() else []
    resumed = _run(base, workdir)
    assert "Traceback" not in resumed.stderr, resumed.stderr[-4000:]
    if saved:
        assert saved[-1] < 4 and f"Resuming from step {saved[-1]}" in resumed.stderr
    else:
        assert "Training from scratch" in resumed.stderr

    assert [line["step"] for line in _train_lines(workdir)] == [1, 2, 3, 4]
    metrics, expected = _train_metrics(workdir), _train_metrics(reference)
    for step in expected:
        assert metrics[step] == pytest.approx(expected[step], abs=1e-6, rel=0), (seed, step)
    final = json.load(open(workdir / "eval" / "4.json"))
    assert final == json.load(open(reference / "eval" / "4.json"))
    _assert_every_checkpoint_restores(workdir)
