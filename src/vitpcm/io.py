"""Small file helpers shared by every stage: class lists, palette PNGs, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from vitpcm.errors import VitpcmError

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

PathLike = Union[str, os.PathLike]

# mkstemp creates 0600 files; give written files the mode open() would (0666 minus the
# umask) so reports and masks stay readable by others. Read once, at import.
_UMASK = os.umask(0)
os.umask(_UMASK)


def pascal_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``[n, 3]`` uint8, index 0 black, 255 (ignore) cream."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


_PALETTE = pascal_palette().reshape(-1).tolist()


def read_classes(path: PathLike) -> List[str]:
    """Read a class list: one name per line, background first, blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(
            f"class list {path} not found: give a file (one name per line, background first) or one of {BUILTIN_CLASS_LISTS}"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2:
        raise VitpcmError(f"class list {path} has {len(names)} names; it needs background plus at least one class")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise VitpcmError(f"class list {path} repeats names {dup}: each class must appear once")
    if len(names) > 255:
        raise VitpcmError(f"class list {path} has {len(names)} names; masks hold at most 255 classes (255 = ignore)")
    return names


BUILTIN_CLASS_LISTS = ("voc12", "coco14")


def class_list(spec: PathLike) -> List[str]:
    """Class names from a file, or from a built-in list: ``voc12`` (21) or ``coco14``
    (81, the authors' ``labels.txt`` order)."""
    if str(spec) in BUILTIN_CLASS_LISTS and not Path(spec).exists():
        return read_classes(Path(__file__).resolve().parent / "resources" / f"{spec}_classes.txt")
    return read_classes(spec)


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
        os.chmod(tmp, 0o666 & ~_UMASK)
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
    import ctypes

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


def _pid_of_temporary(name: str) -> Optional[int]:
    stem = name[: -len(_TMP_SUFFIX)]
    token = stem.rsplit(".", 1)[-1]
    head = token.split("-", 1)[0]
    return int(head) if "-" in token and head.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as gone)."""
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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
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
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: fall back to the PID check
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
    import sys

    return " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:500]


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_mask_png(path: PathLike, mask: np.ndarray, text: Optional[Dict[str, str]] = None) -> None:
    """Write an ``[H, W]`` integer mask as a palette PNG (PASCAL colours), atomically.

    ``text``: PNG text chunks (``tEXt``), e.g. what made the mask, so a rerun can tell a
    finished mask from a stale one (:func:`read_png_text`); image readers ignore them."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("mask values must lie in 0..255")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE)
    buf = io.BytesIO()
    pnginfo = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        pnginfo = PngInfo()
        for key, value in text.items():
            pnginfo.add_text(key, value)
    img.save(buf, format="PNG", pnginfo=pnginfo)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_png_text(path: PathLike) -> Optional[Dict[str, str]]:
    """The text chunks of a PNG (header only, no pixel decoding); None when the file is
    missing or not a readable PNG."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                return None
            # img.info holds the chunks before the pixels (where save_mask_png puts them);
            # img.text would decode the whole image to look for chunks after them
            return {str(k): v for k, v in img.info.items() if isinstance(v, str)}
    except (OSError, SyntaxError, ValueError):
        return None


def save_npz_atomic(path: PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` through a temporary file. Not compressed: float32 probabilities barely
    compress (zlib saves ~10 % of a VOC image's npz at ~35x the time, 63 ms against 1.7 ms,
    which made the writes the bottleneck of inference on a GPU; docs/scaling.md)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_mask_png(path: PathLike) -> np.ndarray:
    """Read a label PNG (palette or greyscale) as an ``[H, W]`` uint8 array of class indices."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                raise VitpcmError(
                    f"mask {path} has mode {img.mode}; expected a palette or greyscale PNG of class indices"
                )
            arr = np.asarray(img)
    except (OSError, SyntaxError) as exc:
        raise VitpcmError(f"cannot read mask {path}: {exc}") from None
    if arr.dtype != np.uint8:
        if arr.max() > 255 or arr.min() < 0:
            raise VitpcmError(f"mask {path} holds values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr


# Image suffixes the package recognises (lower case; matched case-insensitively): the
# own-folder format picks them up in images/, the CRF and the report look for them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# Folders whose name may lead a list entry (``/JPEGImages/x.jpg`` in SBD's train_aug.txt).
_LIST_PREFIXES = ("images", "JPEGImages", "SegmentationClassAug", "SegmentationClass")


def item_name(token: str) -> str:
    """The item name of a list/tag-file entry: ``/JPEGImages/x.jpg``, ``images/a/x.png``,
    ``x.jpg`` and ``x`` -> ``x`` (``a/x`` keeps its sub-folder below ``images/``)."""
    p = PurePosixPath(token.strip().replace("\\", "/"))
    parts = [s for s in p.parts if s not in ("/", ".")]
    if parts and parts[0] in _LIST_PREFIXES and len(parts) > 1:
        parts = parts[1:]
    if parts and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS + (".mat",):
        parts[-1] = PurePosixPath(parts[-1]).stem
    return "/".join(parts)


def read_names(path: PathLike) -> List[str]:
    """Read a split list: one image per line. The first token of a line may be a bare name
    or a path (``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` -> ``x``); a second column
    (VOC's ``x  1`` class lists, SBD's mask path) is ignored. A UTF-8 byte-order mark is
    dropped; blank lines are skipped. A line whose rest is neither such a column (a number,
    a path) is most likely a name with a space, which names cannot hold: that is logged as a
    warning naming the line, as only its first word is used."""
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(f"split list {path} not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VitpcmError(f"cannot read split list {path}: {exc}") from None
    names, spaced = [], []
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        names.append(item_name(tokens[0]))
        if len(tokens) > 1 and not (len(tokens) == 2 and _second_column(tokens[1])):
            spaced.append((number, line.strip()))
    if spaced:
        import logging

        number, line = spaced[0]
        logging.getLogger(__name__).warning(
            "split list %s: %d line(s) hold a space, e.g. line %d %r: only %r is used as the name (names"
            " cannot contain spaces; rename the files, or a second column must be a number or a path)",
            path, len(spaced), number, line, item_name(line.split()[0]),
        )  # fmt: skip
    return names


def _second_column(token: str) -> bool:
    """A second column of a known list format: VOC's ``-1`` / ``0`` / ``1``, SBD's mask path."""
    if token.lstrip("-").isdigit():
        return True
    return "/" in token or "\\" in token  # "my photo.jpg": a name with a space, not a column


def find_image(folder: PathLike, name: str) -> Path:
    """``folder/NAME.<ext>`` for any of :data:`IMAGE_EXTENSIONS` (either case), ``.jpg`` first."""
    folder = Path(folder)
    for suffix in IMAGE_EXTENSIONS:
        for variant in (suffix, suffix.upper()):
            path = folder / f"{name}{variant}"
            if path.is_file():
                return path
    raise VitpcmError(
        f"no image for {name} in {folder} (looked for {name}.jpg/.jpeg/.png/...): give the folder of the original images"
    )


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot ``[num_classes]`` float32 tags from a mask (255 ignored), background always on."""
    values = np.unique(mask)
    values = values[values != IGNORE_INDEX]
    if values.size and values.max() >= num_classes:
        raise ValueError(f"mask value {int(values.max())} outside the {num_classes} classes")
    tags = np.zeros(num_classes, dtype=np.float32)
    tags[values.astype(np.int64)] = 1.0
    tags[0] = 1.0
    return tags


def names_in(folder: PathLike, suffix: str) -> List[str]:
    """Item names of the ``NAME<suffix>`` files under ``folder``, sorted; names may hold
    sub-folders (``sub/c`` for ``folder/sub/c.png``, as the own-folder format makes them).
    Hidden files (atomic-write temporaries) are left out."""
    folder = Path(folder)
    names = []
    for path in folder.rglob(f"*{suffix}"):
        rel = path.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix()[: -len(suffix)])
    return sorted(names)


def format_names(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c (+N more)`` for error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
