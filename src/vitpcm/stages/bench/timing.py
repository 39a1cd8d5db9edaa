"""The bench's clocks: device sync, medians and rounding of runs, a fresh process timed."""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Sequence, Tuple

import torch


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (NaN for none)."""
    return float(statistics.median(values)) if values else float("nan")


def rounded(x: float, nd: int = 4) -> float:
    """``x`` as a float rounded to ``nd`` decimals (the JSON's precision)."""
    return round(float(x), nd)


def vitpcm_command() -> List[str]:
    """The installed ``vitpcm`` script beside this Python, else ``python -m vitpcm``."""
    script = Path(sys.executable).with_name("vitpcm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vitpcm"]


def timed_process(cmd: Sequence[str]) -> Tuple[float, float]:
    """Run ``cmd``; (wall seconds, CPU seconds of it and every process it started).
    Raises ``RuntimeError`` with the end of its stderr when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
