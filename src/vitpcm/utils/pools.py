"""Process pools whose workers die with their parent, background writer threads, and worker
counts budgeted by memory.

Why: a ``ProcessPoolExecutor`` worker blocks on its task pipe, whose write end it holds
itself (fork), so after a ``kill -9`` of the parent it finishes what it had, then waits
for good under PID 1, holding its memory. :func:`process_pool` gives every worker two
guards, set up before its first task:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (through ctypes): the kernel kills the
  worker the moment the parent dies, whatever the worker is doing (inside pydensecrf's C++
  too);
* everywhere: a daemon thread that checks ``os.getppid()`` once a second and exits the
  worker when it changed (the parent is gone and the worker was re-parented). This also
  covers the race of a parent that dies before ``prctl`` took effect.

Writing: :class:`WriterThreads` runs file writes on threads, a bounded number pending, so
that compressing and writing one batch's files overlaps the next batch's model work.

Memory: :func:`available_memory` reads ``MemAvailable`` (``/proc/meminfo``), capped by the
cgroup's limit (containers); :func:`budget_workers` caps a worker count by it.
Standard library only: ``vitpcm crf`` imports no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from vitpcm.atomic import remove_open_temporaries
from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_INTERVAL = 1.0  # seconds between the watchdog's looks at the parent


def die_with_parent(parent_pid: int) -> None:
    """In a child process: make sure it ends when ``parent_pid`` ends (module docstring)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc symbol: the watchdog remains
            pass
    if os.getppid() != parent_pid:  # the parent died before the guard was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="vitpcm-parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL)
        if os.getppid() != parent_pid:
            os._exit(1)  # no cleanup: the parent, who wanted the result, is gone


def _init_worker(parent_pid: int, initializer: Optional[Callable[..., Any]], initargs: Sequence[Any]) -> None:
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: only the parent acts on it (it cancels the
    # queue and ends the workers), the workers do not each print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # terminate_pool's SIGTERM (another worker failed, Ctrl-C): drop the file being written
    signal.signal(signal.SIGTERM, _stop_worker)
    if initializer is not None:
        initializer(*initargs)


def _stop_worker(signum: int, frame: Any) -> None:
    """A pool worker's SIGTERM: remove the temporaries of its unfinished atomic writes, exit."""
    remove_open_temporaries()
    os._exit(128 + signum)


@contextlib.contextmanager
def process_pool(
    workers: int,
    mp_context: Any = None,
    initializer: Optional[Callable[..., Any]] = None,
    initargs: Sequence[Any] = (),
) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` processes that die with this process.

    ``mp_context``: a multiprocessing context (e.g. ``get_context("fork")``) or None for
    the default. ``initializer(*initargs)`` runs in each worker after the guards.

    On leaving normally the pool is shut down and waited for. On an exception (a worker's
    error, Ctrl-C) the queue is cancelled and the workers are terminated at once rather
    than waited for: every output is written atomically, so an interrupted task leaves
    nothing half-written (a worker stopped mid-write removes its temporary first), and a
    big image would otherwise hold the exit for minutes.
    """
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp_context,
        initializer=_init_worker,
        initargs=(os.getpid(), initializer, tuple(initargs)),
    )
    try:
        yield pool
    except BaseException:
        terminate_pool(pool)
        raise
    else:
        pool.shutdown(wait=True)


def terminate_pool(pool: ProcessPoolExecutor, grace: float = 2.0, settle: float = 30.0) -> None:
    """Cancel what has not started, stop the workers (SIGTERM, then SIGKILL after ``grace``
    seconds), reap them and let the executor settle the futures they were running (its
    manager thread, waited for up to ``settle`` seconds: it exits as soon as it has seen the
    dead workers, but on a loaded machine that can take longer than ``grace``)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(Exception):
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
    # the executor's manager thread marks the futures still running as failed once it sees
    # their workers gone: wait for it (bounded), so the caller finds every future settled
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(settle)


# ----------------------------------------------------------------------------- writer threads
class WriterThreads:
    """Run write jobs (``fn(*args)``) on ``threads`` threads, at most ``depth`` pending.

    zlib and PNG encoding release the GIL, so the writes of one batch overlap the model's
    next one. ``submit`` waits while ``depth`` jobs are pending (memory stays bounded) and
    re-raises the first failed job's exception in the caller; leaving the ``with`` block waits
    for every job, so the caller's files are all on disk (or an error raised) when it returns.
    ``threads`` <= 1: each job runs at once in the caller (no thread).
    """

    def __init__(self, threads: int, depth: Optional[int] = None) -> None:
        self.threads = int(threads)
        self.depth = int(depth) if depth else 2 * max(1, self.threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vitpcm-writer") if self.threads > 1 else None
        self._pending: List[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._pool is None:
            fn(*args)
            return
        self._reap(block=len(self._pending) >= self.depth)
        self._pending.append(self._pool.submit(fn, *args))

    def _reap(self, block: bool) -> None:
        if block and self._pending:
            wait(self._pending, return_when=FIRST_COMPLETED)
        still: List[Future] = []
        for f in self._pending:
            if f.done():
                f.result()  # re-raises the job's exception here
            else:
                still.append(f)
        self._pending = still

    def close(self) -> None:
        """Wait for every job; re-raise the first failure."""
        if self._pool is None:
            return
        try:
            for f in self._pending:
                f.result()
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "WriterThreads":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # already failing: let the started writes finish (each is atomic), drop the rest
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending = []


# ----------------------------------------------------------------------------- memory
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Any, key: str = "memory") -> Optional[int]:
    """Bytes from ``8G``, ``512M``, ``1.5GB``, ``2GiB``, ``1073741824``; None for ``auto``
    (or 0, empty, None). Binary units (G = 2**30). Anything else: a :class:`VitpcmError`
    naming ``key``."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip().lower()
    if text in ("", "auto", "0", "0.0", "none"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?", text)
    if not m or (m.group(3) and not m.group(2) and m.group(3) != "b"):
        raise VitpcmError(f"{key}={value!r} is not a memory size: use auto, or e.g. 8G, 512M, 1.5G")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not m.group(2) and not m.group(3) and size < 1 << 20:  # "8": surely not 8 bytes
        raise VitpcmError(f"{key}={value!r} has no unit: write e.g. {m.group(1)}G or {m.group(1)}M")
    return size if size > 0 else None


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style text for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v2, then v1); None when unlimited."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":  # v2
            base = "/sys/fs/cgroup" + path.rstrip("/")
            for folder in (base, "/sys/fs/cgroup"):
                limit = _read_int(f"{folder}/memory.max")
                used = _read_int(f"{folder}/memory.current")
                if limit is not None and used is not None:
                    return max(0, limit - used)
        elif "memory" in controllers.split(","):  # v1
            for folder in ("/sys/fs/cgroup/memory" + path.rstrip("/"), "/sys/fs/cgroup/memory"):
                limit = _read_int(f"{folder}/memory.limit_in_bytes")
                used = _read_int(f"{folder}/memory.usage_in_bytes")
                if limit is not None and used is not None and limit < 1 << 60:  # 1 << 63 = unlimited
                    return max(0, limit - used)
    return None


def available_memory() -> Optional[int]:
    """Bytes that new processes can still use without swapping: ``MemAvailable`` of
    ``/proc/meminfo`` (else free pages), at most the headroom under the cgroup's memory
    limit; None when the system does not say."""
    avail: Optional[int] = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    headroom = _cgroup_headroom()
    if headroom is not None:
        avail = headroom if avail is None else min(avail, headroom)
    return avail


def memory_budget(setting: Any = "auto", share: int = 1, key: str = "memory") -> Optional[int]:
    """The bytes a stage may spend: ``setting`` (e.g. ``8G``), or with ``auto`` 80 % of
    :func:`available_memory`; divided by ``share`` (processes on this machine sharing it,
    e.g. torchrun's LOCAL_WORLD_SIZE). None when unknown (no cap)."""
    budget = parse_size(setting, key)
    if budget is None:
        avail = available_memory()
        budget = int(avail * 0.8) if avail is not None else None
    if budget is None:
        return None
    return budget // max(1, int(share))


def budget_workers(workers: int, bytes_per_worker: int, budget: Optional[int]) -> Tuple[int, Optional[str]]:
    """``workers`` capped so that ``workers x bytes_per_worker`` fits in ``budget`` (at least
    one). Returns the count and, when memory lowered it, a sentence saying why."""
    workers = max(1, int(workers))
    if budget is None or bytes_per_worker <= 0:
        return workers, None
    fit = int(budget // bytes_per_worker)
    if fit >= workers:
        return workers, None
    if fit >= 1:
        return fit, (
            f"{fit} worker(s) instead of {workers}: each may need about {format_bytes(bytes_per_worker)}"
            f" and the memory budget is {format_bytes(budget)}"
        )
    return 1, (
        f"1 worker: the largest item may need about {format_bytes(bytes_per_worker)}, more than the memory"
        f" budget of {format_bytes(budget)}; it may swap or be killed (lower the size bound)"
    )
