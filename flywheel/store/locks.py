"""Cross-process locks on files (POSIX `flock`), for work two runs may start at once.

A schedule and a manual run with the same inputs must not both do the work: the
second waits for the first, then finds its result. The lock is released when the
holder's file is closed, which the kernel also does when the process dies, so a
killed run never leaves a lock behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def file_lock(path: str | Path, *, log_wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting for other holders
    (and saying so in the log unless `log_wait` is off, for locks held a moment only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log_wait:
                log.info("waiting for another run that holds %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
