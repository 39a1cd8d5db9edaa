"""Stopping on SIGTERM / SIGINT: note the signal, let the loop save after the step, then stop."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Optional

from vitpcm.errors import VitpcmError


class TrainingStopped(VitpcmError):
    """Training stopped on SIGTERM / SIGINT after saving ``last.pt``; the CLI exits with
    ``exit_code`` (128 + the signal number) and says how to continue."""

    label = "stopped"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class StopSignals:
    """While entered (``with``), SIGTERM and SIGINT only set :attr:`received`: the loop saves
    ``last.pt`` after the current step and raises :meth:`stopped`. A second signal acts as it
    would without vitpcm (SIGINT: ``KeyboardInterrupt``). Handlers can be installed only in
    the main thread; elsewhere nothing is installed.

    Args:
        announce: write one line to stderr on the first signal (rank 0).
    """

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.received: Optional[int] = None
        self._old_handlers: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._old_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, self._old_handlers.get(signum) or signal.SIG_DFL)
            if self.announce:
                os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping"
                            " (send it again to stop at once)\n".encode())  # fmt: skip

    def stopped(
        self, run_dir: Path, epoch: int, batch: int, steps: int, last: Optional[Path], saved: bool = True
    ) -> TrainingStopped:
        """The error that ends the run at batch ``batch`` of epoch ``epoch`` (0-based; batch 0:
        the end of the epoch before), naming ``last`` (the last checkpoint) and how to resume;
        ``saved``: ``last`` was written at this very position."""
        signum = self.received or signal.SIGTERM
        at = f"epoch {epoch + 1}, batch {batch}/{steps}" if batch else f"the end of epoch {epoch}"
        if saved and last is not None:
            what = f"saved {last} at {at}"
        elif last is not None:
            what = f"the last checkpoint is {last}"
        else:
            what = "no checkpoint was written yet"
        return TrainingStopped(
            f"{signal.Signals(signum).name} received: {what}; continue with `vitpcm train --resume --out {run_dir}`",
            signum,
        )


def ignore_sigint() -> None:
    """For data-loader workers: Ctrl-C reaches the whole process group, and the main process
    saves a checkpoint after the current step and ends the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
