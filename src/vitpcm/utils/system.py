"""Facts about the machine the process runs on."""

from __future__ import annotations

import os


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask where the OS has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int) -> int:
    """``workers`` when positive, else one per usable CPU (the CLI's ``0 = auto``)."""
    return int(workers) if workers and int(workers) > 0 else cpu_count()


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
