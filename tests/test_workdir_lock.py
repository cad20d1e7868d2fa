"""The workdir lock: which holders are live, which are stale."""

import json
import os
import socket
import time

import pytest

from wsda_jax import workdir_lock


def _write_lock(workdir, **holder):
    lock = {"host": socket.gethostname(), "started": 0, **holder}
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(lock))


def test_a_live_run_keeps_its_lock(tmp_path):
    parent = os.getppid()  # A live process that is not this one.
    _write_lock(tmp_path, pid=parent, process_start=workdir_lock._process_start(parent))
    with pytest.raises(workdir_lock.WorkdirLocked, match=f"in use by another run \\(pid {parent}"):
        workdir_lock.acquire(str(tmp_path))


@pytest.mark.parametrize("holder", ["this process", "a reused pid"])
def test_a_lock_whose_pid_now_names_another_process_is_stale(tmp_path, holder):
    """A container restarted after a kill gives its new run the old run's pid (often 1):
    that lock names this very process, or a live process that started later."""
    if holder == "this process":
        _write_lock(tmp_path, pid=os.getpid(), process_start="1")
    else:
        _write_lock(tmp_path, pid=os.getppid(), process_start="1")
    path = workdir_lock.acquire(str(tmp_path))
    lock = json.loads(open(path).read())
    assert lock["pid"] == os.getpid()
    assert lock["process_start"] == workdir_lock._process_start(os.getpid()) is not None
    workdir_lock.release(path)
    assert not os.path.exists(path)


def _age(path, seconds):
    os.utime(path, (time.time() - seconds, time.time() - seconds))


@pytest.mark.parametrize(
    "holder, age_s, stale",
    [
        ({"host": "preempted-vm", "pid": 7, "heartbeat": 60.0}, 11 * 60, True),
        ({"host": "preempted-vm", "pid": 7, "heartbeat": 60.0}, 5, False),
        ({"host": "preempted-vm", "pid": 7}, 11 * 60, False),  # No heartbeats: never.
        # Same host, another container's pid namespace: its pid 1 is not this process.
        ({"pid": 1, "pid_namespace": -1, "heartbeat": 60.0}, 5, False),
        ({"pid": 1, "pid_namespace": -1, "heartbeat": 60.0}, 11 * 60, True),
    ],
)
def test_a_holder_that_cannot_be_looked_up_is_stale_once_it_stops_refreshing(
    tmp_path, holder, age_s, stale
):
    """Another host (a preempted VM replaced by a new one) or another pid namespace: the
    lock's time, refreshed every minute while its run lives, decides."""
    _write_lock(tmp_path, **holder)
    _age(tmp_path / workdir_lock.LOCK_FILE, age_s)
    if stale:
        workdir_lock.release(workdir_lock.acquire(str(tmp_path)))
    else:
        with pytest.raises(workdir_lock.WorkdirLocked) as error:
            workdir_lock.acquire(str(tmp_path))
        refreshed = "replaced after 10 minutes" in str(error.value)
        assert refreshed == bool(holder.get("heartbeat"))


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    with workdir_lock.hold(str(tmp_path)) as path:
        _age(path, 3600)
        time.sleep(0.5)
        assert time.time() - os.path.getmtime(path) < 60
    assert not os.path.exists(path)
