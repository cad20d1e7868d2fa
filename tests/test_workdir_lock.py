"""The workdir lock: which holders are live, which are stale."""

import json
import os
import socket

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
