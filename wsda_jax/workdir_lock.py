"""One run per workdir: `WORKDIR/lock` holds the host and pid of the run that owns it.

Two runs writing one workdir would interleave metrics.jsonl and race on checkpoints, so
`hold(workdir)` creates the lock file exclusively (O_EXCL) and removes it when the run
ends, however it ends short of SIGKILL. A lock left by a run that died is stale: it is
replaced, with a warning. On the same host and in the same pid namespace the holder's
process is looked up: gone, or its pid now this process's or another process's (a
restarted container reuses pids, so the lock also holds its process's start time).
Elsewhere (another host after a preemption, another container) it cannot be; there the
holder refreshes the lock's time every minute, and a lock not refreshed for 10 minutes
is stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

from absl import logging

LOCK_FILE = "lock"
HEARTBEAT_S = 60.0  # How often the holder refreshes the lock's modification time.
STALE_AFTER_S = 600.0  # A lock whose holder cannot be looked up, not refreshed this long.


class WorkdirLocked(ValueError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, owned by another user.
        return True
    return True


def _process_start(pid: int) -> str | None:
    """When process `pid` started (Linux: clock ticks after boot), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None  # Field 22 of proc(5), from field 3.


def _pid_namespace() -> int | None:
    """This process's pid namespace (Linux), or None if unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _read(path: str) -> dict | None:
    """The lock's content, or None when it is unreadable (being written, or garbage)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _create(path: str, owner: dict) -> bool:
    """Creates the lock file with `owner`; False if it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
    return True


def _can_look_up(holder: dict) -> bool:
    """Whether the holder's process can be looked up from here: same host and pid
    namespace (a lock from an older version names no namespace)."""
    same_namespace = holder.get("pid_namespace") in (None, _pid_namespace())
    return holder.get("host") == socket.gethostname() and same_namespace


def _is_stale(holder: dict | None, path: str) -> bool:
    """The holder's process is gone (same host and pid namespace: its pid is dead, is
    ours, or started at another time; elsewhere: the lock is no longer refreshed), or
    the file is garbage for a while."""
    age = time.time() - os.path.getmtime(path)
    if holder is None:
        # Unreadable: another run may be writing it this very moment; garbage after 10 s.
        return age > 10
    if not _can_look_up(holder):
        # A lock without heartbeats (from an older version) never goes stale this way.
        return bool(holder.get("heartbeat")) and age > STALE_AFTER_S
    pid = holder.get("pid")
    if not (isinstance(pid, int) and pid > 0) or pid == os.getpid() or not _pid_alive(pid):
        return True
    recorded, current = holder.get("process_start"), _process_start(pid)
    return recorded is not None and current is not None and recorded != current


def acquire(workdir: str) -> str:
    """Takes the lock of `workdir`; returns its path. Raises WorkdirLocked (one line)."""
    path = os.path.join(workdir, LOCK_FILE)
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "pid_namespace": _pid_namespace(),
        "heartbeat": HEARTBEAT_S,
        "started": time.time(),
    }
    for _ in range(3):
        if _create(path, owner):
            return path
        holder = _read(path)
        if not _is_stale(holder, path):
            if holder is None:
                raise WorkdirLocked(f"--workdir={workdir} is locked by another run ({path})")
            started = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0)))
            )
            replaced = (
                f" (a lock its run stopped refreshing is replaced after {STALE_AFTER_S / 60:g} "
                "minutes)"
                if holder.get("heartbeat") and not _can_look_up(holder)
                else ""
            )
            raise WorkdirLocked(
                f"--workdir={workdir} is in use by another run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {started}); wait for it to end, or delete "
                f"{path} if that run is gone{replaced}"
            )
        # Remove only the stale file that was read, not a fresh one another run wrote.
        if _read(path) == holder:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            logging.warning(
                "Removed the stale lock %s of a run that is gone (%s).",
                path,
                f"pid {holder.get('pid')}" if holder else "unreadable",
            )
    raise WorkdirLocked(f"--workdir={workdir}: could not take {path}")


def release(path: str) -> None:
    """Removes the lock file if this process still owns it."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[str]:
    """`acquire` on entry, `release` on exit (also on an exception or a handled signal);
    while held, a thread refreshes the lock's time every HEARTBEAT_S seconds."""
    path = acquire(workdir)
    stop = threading.Event()
    beat = threading.Thread(target=_refresh, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join()
        release(path)


def _refresh(path: str, stop: threading.Event) -> None:
    """Touches the lock while this process owns it, until `stop` is set."""
    while not stop.wait(HEARTBEAT_S):
        holder = _read(path)
        ours = holder and (holder.get("host"), holder.get("pid")) == (
            socket.gethostname(),
            os.getpid(),
        )
        if not ours:
            return  # Taken over or removed: never touch another run's lock.
        with contextlib.suppress(OSError):  # A full or read-only disk: the next beat.
            os.utime(path)


def check_writable(workdir: str) -> None:
    """Creates `workdir` if needed; a one-line ValueError if no file can be written there."""
    try:
        os.makedirs(workdir, exist_ok=True)
        # A unique name: several processes may share the workdir.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
            pass
    except OSError as error:
        raise ValueError(f"--workdir={workdir} cannot be written: {error.strerror}") from error


def hold_on_writer(workdir: str, process_index: int) -> contextlib.AbstractContextManager:
    """The lock for a run that writes `workdir`: held by process 0, the writer of several."""
    return hold(workdir) if process_index == 0 else contextlib.nullcontext()
