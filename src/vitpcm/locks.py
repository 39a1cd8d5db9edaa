"""One writer per folder: FolderLock, an flock file that names its holder."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from vitpcm.atomic import NEW_FILE_MODE, PathLike, disk_error, pid_alive
from vitpcm.errors import VitpcmError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class FolderLock:
    """One writer per folder: an exclusive ``flock`` on ``path`` holding the owner's PID,
    host, start time and command as JSON.

    The kernel drops the lock when its process dies (kill -9 included), so a lock left by
    a dead process is simply taken over; its old content is returned by :meth:`acquire` so
    the caller can say so. A live holder makes :meth:`acquire` raise :class:`VitpcmError`
    at once, naming the PID and host. Where the file system refuses ``flock`` the PID and
    host in the file decide (a live PID on this host holds the folder).
    """

    def __init__(self, path: PathLike, what: str = "process") -> None:
        self.path = Path(path)
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[Dict[str, Any]]:
        """Take the lock; returns the previous holder's record when it was a stale lock of a
        process that is gone (None for a free folder). Raises when another process holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, NEW_FILE_MODE)
        except OSError as exc:
            raise (disk_error(exc, self.path, unchanged=False) or exc) from None
        try:
            previous = _read_lock_record(fd)
            if not _flock(fd):
                raise VitpcmError(self._held_message(previous))
            if previous is None:
                stale = None
            elif previous.get("pid") == os.getpid() and previous.get("host") == socket.gethostname():
                stale = None  # our own (a second Trainer in the same process after the first ended)
            else:
                stale = previous
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command_line()}  # fmt: skip
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return stale

    def _held_message(self, holder: Optional[Dict[str, Any]]) -> str:
        who = "another process"
        if holder:
            who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
        return (
            f"{self.path.parent} is in use by another {self.what} ({who}): one process writes a folder"
            f" at a time; wait for it to end or choose another folder"
        )

    def release(self) -> None:
        """Empty the file and drop the lock (the file stays: deleting it would race with a
        process opening it)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _flock(fd: int) -> bool:
    """Try an exclusive non-blocking lock; False when another process holds it."""
    if fcntl is None:  # pragma: no cover - not POSIX: fall back to the PID check
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # the file system has no flock (some network mounts): PID and host decide
        record = _read_lock_record(fd)
        if record and record.get("host") == socket.gethostname() and record.get("pid") != os.getpid():
            return not pid_alive(int(record.get("pid", 0) or 0))
        return True


def _read_lock_record(fd: int) -> Optional[Dict[str, Any]]:
    try:
        data = os.pread(fd, 65536, 0)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        record = json.loads(data.decode("utf-8"))
    except ValueError:  # torn or foreign content: a holder we cannot name
        record = None
    return record if isinstance(record, dict) else {"pid": "?", "host": "?"}


def _command_line() -> str:
    return " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:500]
