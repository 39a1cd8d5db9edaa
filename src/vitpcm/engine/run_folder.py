"""The run folder during training: one writer (the lock), what a start may find there, its files."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import torch

from vitpcm.atomic import DiskError, disk_error, remove_temporaries, write_text_atomic
from vitpcm.engine.distributed import Dist, any_rank
from vitpcm.errors import VitpcmError
from vitpcm.locks import FolderLock
from vitpcm.runs import RunLayout

log = logging.getLogger(__name__)


class RunFolder:
    """Holds ``layout.root`` for one training run (rank 0 writes, every rank may raise).

    Created, it holds ``RUN/.lock`` (PID and host; a lock left by a dead process is taken
    over with a note), or raises on every rank when another process holds it. Call
    :meth:`release` when done (also done when the object is collected).

    Args:
        layout: the run's paths.
        dist: ranks (only rank 0 locks and writes).
        device: where the ranks agree on a failure.
    """

    def __init__(self, layout: RunLayout, dist: Dist, device: torch.device) -> None:
        self.layout = layout
        self.root = layout.root
        self.main = dist.main
        self._pending_config: Optional[str] = None
        self._lock = FolderLock(layout.lock, "vitpcm train") if dist.main else None
        self._finalizer: Optional[weakref.finalize] = None
        failure: Optional[BaseException] = None
        if self._lock is not None:
            try:
                stale = self._lock.acquire()
                self._finalizer = weakref.finalize(self, self._lock.release)
                if stale:
                    log.warning("%s: took over the lock of PID %s on %s (started %s), which is no longer running",
                                self.root, stale.get("pid"), stale.get("host"), stale.get("started"))  # fmt: skip
            except BaseException as exc:  # every rank must stop, not only rank 0
                failure = exc
        if any_rank(failure is not None, dist, device):
            raise failure if failure is not None else VitpcmError(f"{self.root} is in use by another process")

    def release(self) -> None:
        """Free the lock (again: nothing)."""
        if self._finalizer is not None:
            self._finalizer()

    def start(self, resume: bool) -> bool:
        """Whether this start resumes: an existing run without ``resume`` is refused, and a
        ``resume`` of a run stopped before its first save starts from the beginning. Removes
        the temporary files of a killed save (under the lock nothing else writes here)."""
        last = self.layout.checkpoint("last")
        if last.is_file() and not resume:
            raise VitpcmError(
                f"{self.root} already holds a training run: pass --resume to continue it, or choose another --out"
            )
        if resume and not last.is_file():
            if not self.layout.config.is_file():
                raise VitpcmError(f"--resume: {last} not found, nothing to resume")
            if self.main:
                log.info("--resume: %s holds no checkpoint yet (stopped before its first save): starting from the"
                         " beginning", self.root)  # fmt: skip
            resume = False
        if self.main:
            gone = remove_temporaries(self.layout.checkpoints, only_dead=False)
            gone += remove_temporaries(self.layout.root) + remove_temporaries(self.layout.logs)
            if gone:
                log.info("removed %d unfinished temporary file(s) of a killed save: %s", len(gone),
                         ", ".join(p.name for p in gone[:3]))  # fmt: skip
        return resume

    def write_files(self, config_text: Optional[str], classes: Optional[list], defer_config: bool) -> None:
        """``checkpoints/``, ``logs/``, ``config.yaml`` and ``classes.txt`` (rank 0).
        ``defer_config`` (a resume with changed settings): ``config.yaml`` keeps describing the
        last checkpoint until the first save of this run (:meth:`checkpoint_saved`), so a
        resume that diverges at once leaves it as it was."""
        if not self.main:
            return
        self.layout.checkpoints.mkdir(parents=True, exist_ok=True)
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        if config_text is not None and defer_config and self.layout.config.is_file():
            self._pending_config = config_text
        elif config_text is not None:
            write_text_atomic(self.layout.config, config_text)
        if classes is not None:
            write_text_atomic(self.layout.classes, "\n".join(classes) + "\n")

    def checkpoint_saved(self) -> None:
        """After rank 0 saved ``last.pt``: a deferred ``config.yaml`` now describes it."""
        if self._pending_config is not None:
            write_text_atomic(self.layout.config, self._pending_config)
            self._pending_config = None

    def record_resume(
        self, checkpoint: Path, epoch: int, batch: int, step: int, changes: Mapping[str, Tuple[Any, Any]], where: str
    ) -> None:
        """Log a resume from ``checkpoint`` (at ``where``: batch ``batch`` of epoch ``epoch``,
        0-based, step ``step``) and what it changes (``{key: (old, new)}``), and append it to
        ``logs/resumes.jsonl`` (rank 0)."""
        if not self.main:
            return
        log.info("resuming %s from %s (step %d)", self.root, where, step)
        for key, (old, new) in changes.items():
            log.info("--resume: %s %s -> %s", key, old, new)
        record = {
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "checkpoint": str(checkpoint),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "changed": {k: {"from": old, "to": new} for k, (old, new) in changes.items()},
        }
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        with open(self.layout.resumes, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def tensorboard(self, purge_step: Optional[int] = None) -> Any:
        """A ``SummaryWriter`` on ``logs/`` (rank 0, when TensorBoard is installed), else None.
        ``purge_step``: the steps a killed run logged after its checkpoint are logged again."""
        if not self.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: metrics.jsonl still has everything
            log.info("tensorboard is not installed; logging to metrics.jsonl only")
            return None
        return SummaryWriter(log_dir=str(self.layout.logs), purge_step=purge_step)

    def disk_error(self, exc: OSError) -> OSError:
        """A write failure in the run folder as one line naming the folder (else ``exc``)."""
        name = getattr(exc, "filename", None)
        if isinstance(exc, DiskError):
            return exc
        inside = name is not None and Path(name).resolve().is_relative_to(self.root.resolve())
        write_only = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
        if inside or (name is None and write_only):
            return disk_error(exc, Path(name) if name else self.root / "(a file)") or exc
        return exc
