"""Peak memory of a block of code: the CUDA allocator's peak, or the sampled resident set size."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from pathlib import Path
from typing import Any, Iterator

import torch


class PeakMemory:
    """Peak memory during ``with tracker.measure():`` blocks, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (the allocator's peak, reset at each block).
    CPU: the resident set size of this process, sampled every 5 ms by a thread.
    ``peak_mb`` is the largest value over all blocks; ``kind`` says which was measured.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak"
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        """The resident set size of this process now, in MiB."""
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the lifetime peak

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Raise ``peak_mb`` to the peak of the block."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                torch.cuda.synchronize(self.device)
                self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated(self.device) / 2**20)
            return
        stop = threading.Event()
        peak = [self.rss_mb()]

        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], self.rss_mb())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak_mb = max(self.peak_mb, peak[0], self.rss_mb())
