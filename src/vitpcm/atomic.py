"""Atomic writes: a file is replaced whole or not at all, and write failures become one-line DiskErrors."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from vitpcm.errors import VitpcmError

PathLike = Union[str, os.PathLike]

# mkstemp creates 0600 files; give written files the mode open() would (0666 minus the
# umask) so reports and masks stay readable by others. Read once, at import.
_UMASK = os.umask(0)
os.umask(_UMASK)
#: The mode ``open()`` gives a new file here (0666 minus the umask).
NEW_FILE_MODE = 0o666 & ~_UMASK


class DiskError(VitpcmError, OSError):
    """A file could not be written: full disk, quota, read-only or forbidden folder, file-size
    limit. A :class:`VitpcmError` (one line in the CLI) and an :class:`OSError` (code that
    catches write failures keeps working); ``errno`` is the system's."""

    def __str__(self) -> str:
        # the message alone: OSError's own form would be "[Errno 28] None: 'file'" once errno is set
        return str(self.args[0]) if self.args else super().__str__()


# errno -> (what happened, what to do); only these are turned into a DiskError
_SPACE = "free some space there or write elsewhere"
_WRITABLE = "make the folder writable or write elsewhere"
_DISK_ERRNOS = {
    errno.ENOSPC: ("no space left on device", _SPACE),
    errno.EDQUOT: ("disk quota exceeded", _SPACE),
    errno.EROFS: ("read-only file system", _WRITABLE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
    errno.EFBIG: ("file too large (a file-size limit, see ulimit -f)", "raise the limit or write elsewhere"),
}


def disk_error(exc: OSError, path: PathLike, unchanged: Optional[bool] = None) -> Optional[DiskError]:
    """A one-line :class:`DiskError` naming ``path``'s folder for a write failure, or None when
    ``exc`` is not a disk/permission problem (then the caller re-raises it unchanged).
    ``unchanged``: say that the previous file is intact (default: when ``path`` exists)."""
    known = _DISK_ERRNOS.get(getattr(exc, "errno", None) or -1)
    if known is None:
        return None
    reason, fix = known
    path = Path(path)
    kept = path.is_file() if unchanged is None else unchanged
    err = DiskError(
        f"cannot write {path.name} in {path.parent}: {reason}"
        f"{' (the previous ' + path.name + ' is unchanged)' if kept else ''}: {fix}"
    )
    err.errno = exc.errno
    err.filename = str(path)
    return err


# Temporaries of atomic writes: ``.NAME.PID-RANDOM.tmp`` beside NAME (the PID tells a leftover
# of a killed process from a write in progress).
_TMP_SUFFIX = ".tmp"


#: This process's temporaries of atomic writes in progress (:func:`remove_open_temporaries`).
_OPEN_TEMPORARIES: set = set()


def remove_open_temporaries() -> None:
    """Delete the temporaries of the atomic writes this process has in progress. For a
    handler of a stop signal (a pool's worker stopped while another one's error ends the
    run): the worker then leaves nothing behind, not even a hidden ``.NAME.PID-XXXX.tmp``."""
    for tmp in list(_OPEN_TEMPORARIES):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A crash or kill while writing leaves the old file (or none), never a half-written one;
    a kill -9 can leave the temporary ``.NAME.PID-XXXX.tmp`` (hidden; removed by
    :func:`remove_temporaries`). A full disk, a read-only or forbidden folder raise one-line
    :class:`DiskError` (also an ``OSError``) naming the folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=_TMP_SUFFIX, dir=path.parent)
        _OPEN_TEMPORARIES.add(tmp)
        os.close(fd)
        os.chmod(tmp, NEW_FILE_MODE)
    except OSError as exc:
        raise (disk_error(exc, path) or exc) from None
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        except OSError as exc:
            # only failures of this write (not e.g. a missing input the body was reading)
            mine = getattr(exc, "filename", None) in (None, str(tmp_path), str(path))
            err = disk_error(exc, path) if mine and not isinstance(exc, DiskError) else None
            if err is None:
                raise
            raise err from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        _OPEN_TEMPORARIES.discard(tmp)


@contextlib.contextmanager
def atomic_fd(path: PathLike) -> Iterator[int]:
    """Yield a file descriptor open for writing ``path``'s new content; on success the
    content replaces ``path`` (the caller writes, and fsyncs if it wants to).

    For long writes (checkpoints). On Linux the bytes go to an unnamed file (``O_TMPFILE``)
    that is given a name only once complete, so a kill -9 during the write leaves nothing
    on disk: the kernel drops the file with the process. Only the final link and rename
    (microseconds) can leave a ``.NAME.PID-XXXX.tmp``. Where the folder cannot do that
    (another OS, a file system without ``O_TMPFILE``, no way to link the file) it is
    :func:`atomic_path`'s named temporary. Disk and permission failures raise one-line
    :class:`DiskError` naming the folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_unnamed(path.parent)
    except OSError as exc:
        raise (disk_error(exc, path) or exc) from None
    if fd is None:
        with atomic_path(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                yield fd
            finally:
                os.close(fd)
        return
    try:
        yield fd
        tmp = _temporary_name(path)
        _OPEN_TEMPORARIES.add(str(tmp))
        try:
            _link_unnamed(fd, tmp)
            try:
                os.replace(tmp, path)  # a link cannot replace an existing name; a rename can
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise (disk_error(exc, path) or exc) from None
        finally:
            _OPEN_TEMPORARIES.discard(str(tmp))
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}{_TMP_SUFFIX}"


_UNNAMED_WORKS: Dict[int, bool] = {}  # st_dev -> whether an O_TMPFILE file there can be linked


def _open_unnamed(folder: Path) -> Optional[int]:
    """An ``O_TMPFILE`` descriptor in ``folder``, or None where such a file cannot be given
    a name there (tried once per file system, with a probe file)."""
    if not hasattr(os, "O_TMPFILE"):
        return None
    dev = folder.stat().st_dev
    if dev not in _UNNAMED_WORKS:
        _UNNAMED_WORKS[dev] = _probe_unnamed(folder)
    if not _UNNAMED_WORKS[dev]:
        return None
    return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o666)  # the kernel applies the umask


def _probe_unnamed(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError:
        return False
    probe = _temporary_name(folder / "probe")
    try:
        _link_unnamed(fd, probe)
        probe.unlink()
        return True
    except (OSError, AttributeError):  # AttributeError: a C library without linkat
        return False
    finally:
        os.close(fd)


def _link_unnamed(fd: int, dest: Path) -> None:
    """Give the unnamed file ``fd`` the name ``dest``: linkat through /proc (any user), else
    linkat(fd, "", AT_EMPTY_PATH) (where /proc's link crosses mounts, as in some containers)."""
    try:
        os.link(f"/proc/self/fd/{fd}", dest)  # follow_symlinks: linkat(..., AT_SYMLINK_FOLLOW)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EACCES):
            raise
    import ctypes  # only for this fallback, which few systems take (2 ms to import)

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_empty_path = -100, 0x1000
    if libc.linkat(fd, b"", at_fdcwd, os.fsencode(dest), at_empty_path) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dest))


def remove_temporaries(folder: PathLike, only_dead: bool = True) -> List[Path]:
    """Delete the atomic-write temporaries (``.NAME.PID-XXXX.tmp``, and the older
    ``.NAME.XXXX.tmp``) directly in ``folder`` that a killed process left behind. With
    ``only_dead`` a temporary whose PID still runs on this machine is kept (a write in
    progress); older names without a PID are always removed. Returns the removed paths."""
    folder = Path(folder)
    removed: List[Path] = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
        pid = _pid_of_temporary(tmp.name)
        if only_dead and pid is not None and pid != os.getpid() and pid_alive(pid):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as gone): tells a dead
    writer's leftover temporary (or lock) from a live one's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (killed, not yet reaped) holds no lock and writes nothing
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _pid_of_temporary(name: str) -> Optional[int]:
    stem = name[: -len(_TMP_SUFFIX)]
    token = stem.rsplit(".", 1)[-1]
    head = token.split("-", 1)[0]
    return int(head) if "-" in token and head.isdigit() else None


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npz_atomic(path: PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` through a temporary file. Not compressed: float32 probabilities barely
    compress (zlib saves ~10 % of a VOC image's npz at ~35x the time, 63 ms against 1.7 ms,
    which made the writes the bottleneck of inference on a GPU; docs/scaling.md)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
