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
