"""Exact resumption in subprocesses, on the tiny synthetic config.

- SIGKILL after a checkpoint, restart: every step's metrics equal an uninterrupted run's.
- SIGTERM on 4 simulated devices: a checkpoint of the current step and exit status 0;
  the run then restores and finishes on 1 device.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checkpoint every step so the interruption lands mid-run; evaluate only at the end.
ARGS = [
    "--config=configs/synthetic_coarse.py:tiny",
    "--config.checkpoint_every_steps=1",
    "--config.keep_checkpoints=10",
]


def _command(base, workdir):
    return [
        sys.executable,
        "-m",
        "wsda_jax.main",
        *ARGS,
        f"--config.data.data_dir={base / 'data'}",
        f"--workdir={workdir}",
    ]


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


def _interrupt_after_first_checkpoint(base, workdir, sig, devices=1):
    """Starts a run, sends `sig` once checkpoint 1 is committed; returns (rc, stderr)."""
    process = subprocess.Popen(
        _command(base, workdir),
        cwd=ROOT,
        env=subprocesses.jax_env(base, devices),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
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


def _train_metrics(workdir):
    """Step -> metrics, the last line of each step winning (a resumed run appends)."""
    metrics = {}
    for line in open(workdir / "metrics.jsonl"):
        entry = json.loads(line)
        if "total" in entry:
            entry.pop("images_per_sec")
            metrics[entry.pop("step")] = entry
    return metrics


def _steps(workdir):
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def test_sigkill_then_restart_matches_uninterrupted_run(tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    _run(base, tmp_path / "reference")
    reference = _train_metrics(tmp_path / "reference")
    assert sorted(reference) == [1, 2, 3, 4]

    interrupted = tmp_path / "interrupted"
    returncode, _ = _interrupt_after_first_checkpoint(base, interrupted, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    killed_at = _steps(interrupted)[-1]
    assert killed_at < 4
    resumed = _run(base, interrupted)
    assert f"Resuming from step {killed_at}" in resumed.stderr

    metrics = _train_metrics(interrupted)
    assert sorted(metrics) == [1, 2, 3, 4]
    for step, expected in reference.items():
        assert metrics[step] == pytest.approx(expected, abs=1e-6, rel=0), step
    final = json.load(open(interrupted / "eval" / "4.json"))
    assert final == json.load(open(tmp_path / "reference" / "eval" / "4.json"))


def test_sigterm_on_four_devices_saves_and_resumes_on_one(tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path / "run"
    returncode, stderr = _interrupt_after_first_checkpoint(base, workdir, signal.SIGTERM, devices=4)
    assert returncode == 0, stderr[-4000:]
    assert "CpuDevice(id=3)" in stderr  # main logs the devices: really 4 of them.
    logged = max(_train_metrics(workdir))
    saved = _steps(workdir)[-1]
    assert saved == logged < 4  # The step being trained when the signal came.
    assert f"Stopped at step {saved}" in stderr

    resumed = _run(base, workdir, devices=1)
    assert "CpuDevice(id=1)" not in resumed.stderr
    assert f"Resuming from step {saved}" in resumed.stderr
    assert max(_train_metrics(workdir)) == 4
    assert json.load(open(workdir / "eval" / "4.json"))["step"] == 4
