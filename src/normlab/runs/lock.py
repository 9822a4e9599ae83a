"""An exclusive lock on a run directory, so that two processes never write one run at once.

The lock is `flock` on the file `RUN/.lock`, which also records the holder's process id and what it does. The
operating system releases it when the holder exits, however it exits (SIGKILL included), so a lock is never
left stale: the next process takes it and cleans up after the one that died.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from normlab.errors import CheckpointError

LOCK_FILE = ".lock"


class RunLock:
    """The lock of one run directory, held from `acquire` to `release` (or the end of the process)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._handle: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._handle is not None

    def acquire(self, purpose: str) -> None:
        """Take the lock for `purpose` (e.g. "train"), or raise `CheckpointError` naming the process that holds
        it. Never follows a symbolic link at `RUN/.lock`."""
        if self._handle is not None:
            return
        try:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as error:
            raise CheckpointError(f"cannot lock {self.path.parent} ({error.strerror}): is it a writable folder, "
                                  "and .lock a plain file?") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(handle)
            os.close(handle)
            raise CheckpointError(f"{self.path.parent} is in use by another normlab process ({holder}): wait for "
                                  "it to finish, or stop it, then try again") from None
        os.ftruncate(handle, 0)
        os.write(handle, json.dumps({"pid": os.getpid(), "purpose": purpose}).encode())
        self._handle = handle

    def release(self) -> None:
        """Give the lock back (the lock file stays)."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            fcntl.flock(handle, fcntl.LOCK_UN)
            os.close(handle)


def _describe(handle: int) -> str:
    try:
        holder = json.loads(os.pread(handle, 4096, 0).decode())
        return f"pid {int(holder['pid'])}, {str(holder['purpose'])[:40]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"
