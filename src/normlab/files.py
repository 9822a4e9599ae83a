"""Writing files so that a crash never leaves a half-written file where a good one was.

`atomic_write` writes a temporary file `.NAME.XXXXXXXX.tmp` beside the target, flushes it to disk and renames it
over the target, so a reader sees the old file or the new one, never a mixture. A process killed in between
leaves only the temporary file behind, which `remove_stale_temporaries` deletes (the run directory does so when
it is next opened for writing). `append_line` never follows a symbolic link.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace` (which replaces a
    symbolic link at `path` rather than following it); the folder entry is flushed too."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        os.chmod(temp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def append_line(path: str | Path, line: str) -> None:
    """Append `line` and a newline to the text file `path` (created if missing), refusing to follow a symbolic
    link there (`OSError`)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    handle = os.open(path, flags, 0o666)
    with os.fdopen(handle, "a", encoding="utf-8") as file:
        file.write(line + "\n")


def sync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (new and renamed files) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def usual_permissions(path: str | Path) -> None:
    """Give a folder made by `tempfile.mkdtemp` (mode 0700) the permissions `mkdir` would have given it."""
    os.chmod(path, 0o777 & ~umask())


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files `atomic_write` left in `folder` when its process was killed; returns them.
    Only call this while no other process writes there."""
    removed = []
    for path in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
