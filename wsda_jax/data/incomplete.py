"""Leftovers of interrupted preparations: TFDS's `incomplete.*` folders.

TFDS writes a dataset into `DATA_DIR/NAME/CONFIG/incomplete.XXXX_VERSION/` and renames
it when done; it removes the folder itself when the preparation raises, but a killed
preparation leaves it (tens of MB to GB) forever. `preparing(builder)` holds an
exclusive lock on the dataset's folder for the whole preparation, so any
`incomplete.*` folder it finds there belongs to a preparation that is no longer running:
it removes those, saying so. Two preparations of the same dataset run one after the
other (the second then finds the dataset prepared).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
from collections.abc import Iterator
from typing import Any

from absl import logging

LOCK_FILE = ".prepare.lock"


def _dataset_folder(builder: Any) -> str:
    """DATA_DIR/NAME/CONFIG: where the versions and their incomplete.* folders live."""
    return os.path.dirname(os.fspath(builder.data_path))


def remove_stale(folder: str) -> list[str]:
    """Removes the `incomplete.*` folders in `folder`; returns their paths. Call it only
    while holding the lock (`preparing`), else a running preparation may lose its folder."""
    removed = []
    for path in sorted(glob.glob(os.path.join(folder, "incomplete.*"))):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logging.warning("Removed %s, left by an interrupted preparation.", path)
    return removed


@contextlib.contextmanager
def preparing(builder: Any) -> Iterator[None]:
    """Holds the dataset folder's lock and clears stale `incomplete.*` folders.

    The lock (`flock`) goes with the process, so a killed preparation never leaves it
    held. Where the file system refuses locks, nothing is removed (a leftover cannot be
    told from a running preparation there).
    """
    folder = _dataset_folder(builder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            remove_stale(folder)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
