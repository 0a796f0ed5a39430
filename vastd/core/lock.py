"""One daemon per root: an exclusive lock on `<root>/.vastd.lock`, held while it runs.

Two daemons on one root would move the same files and write the same snapshot.
The kernel drops the lock when the process dies, however it dies, so a crash
never leaves a stale lock behind; `vastd status` asks the lock whether a daemon runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from vastd.utils.exceptions import VastdError

LOCK_NAME = ".vastd.lock"


class RootLocked(VastdError):
    """Another vastd already runs on this root."""


class RootLock:
    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RootLocked(
                f"another vastd (pid {holder}) already runs on {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def root_locked(root: Path) -> bool | None:
    """True if a daemon holds the root's lock, False if none does, None if unknown."""
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False
