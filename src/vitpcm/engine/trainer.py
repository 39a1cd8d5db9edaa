"""The generic training loop: :meth:`Trainer.fit` -> an epoch -> a step, for any :class:`~vitpcm.engine.task.Task`.

What it does for every task, and where the details live:

* processes and devices: DDP under ``torchrun``, one process otherwise (``distributed.py``);
  AMP on CUDA (bf16 where supported, fp16 with a grad scaler elsewhere);
* data: a shuffled loader per epoch, resumable at any batch (``sampling.py``);
* the step (``step.py``): phases with a *fresh* optimizer each (as the authors recompile the
  Keras model), the task's learning rate before every batch, gradient accumulation;
* divergence (``guards.py``): the loss is checked *before* ``backward`` on every step (every
  rank at once under DDP); a non-finite loss, or one above ``max_loss``, stops the run with
  one line naming the epoch, the step and the last good checkpoint; a state with non-finite
  tensors is never saved;
* the run folder (``run_folder.py``): one writer at a time (``RUN/.lock``), ``config.yaml``,
  ``classes.txt``, ``checkpoints/last.pt`` every epoch and every ``checkpoint_every`` steps
  (``state.py``, written atomically by ``checkpoint.py``), ``checkpoints/best.pt`` when the
  task's metric improves, one ``logs/metrics.jsonl`` row per epoch (means over every rank),
  TensorBoard when installed, tqdm bars on rank 0;
* pre-emption (``signals.py``): SIGTERM or SIGINT saves ``last.pt`` after the current step
  and stops with :class:`TrainingStopped` (a second signal acts at once);
* ``resume`` (``state.py``): continues from ``last.pt`` exactly where it stopped, mid-epoch
  too (weights, optimizer, position, step, best score, the epoch's running sums, random
  generators); metrics rows of epochs that run again are dropped. With ``deterministic``
  (CPU) a run killed at any moment and resumed ends with the weights of an uninterrupted
  run (docs/reliability.md). An existing run without ``resume`` is refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vitpcm.engine.checkpoint import save_checkpoint
from vitpcm.engine.distributed import any_rank, barrier, cleanup, init_distributed
from vitpcm.engine.guards import DivergenceGuard
from vitpcm.engine.run_folder import RunFolder
from vitpcm.engine.sampling import batches_per_epoch, epoch_loader, preserved_rng
from vitpcm.engine.signals import StopSignals, TrainingStopped
from vitpcm.engine.state import EpochTally, Resumed, gather_rng, read_resume, restore_rng
from vitpcm.engine.step import Stepper
from vitpcm.engine.task import EngineContext, Task
from vitpcm.runs import RunLayout

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainSettings", "TrainingStopped", "seed_everything"]


@dataclass
class TrainSettings:
    """The loop's knobs (a stage fills them from its config section).

    Args:
        epochs: total epochs, every phase included.
        batch_size: per process (global = batch_size x world size x accumulation).
        seed: seeds Python, numpy and torch (``seed + rank``) and the sampler (``seed + epoch``).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        threads: torch CPU threads (0 = torch's default).
        amp: autocast on CUDA (ignored on the CPU).
        val_every: epochs between validations (0 = never); the last epoch always validates.
        log_every: batches between TensorBoard scalars.
        num_workers: data-loader worker processes.
        deterministic: per-item seeded augmentation (independent of workers and resumes),
            deterministic torch algorithms, validation outside the training generators: a
            run resumed from any checkpoint ends as the uninterrupted run (on the CPU).
        checkpoint_every: also save ``last.pt`` every this many steps (batches) inside an
            epoch (0 = at epoch ends only).
        max_loss: a finite loss above this counts as divergence (0 = no limit).
    """

    epochs: int
    batch_size: int
    seed: int = 1234
    device: str = "auto"
    threads: int = 0
    amp: bool = True
    val_every: int = 1
    log_every: int = 20
    num_workers: int = 0
    deterministic: bool = False
    checkpoint_every: int = 0
    max_loss: float = 0.0


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """Runs ``task`` as ``settings`` say, writing the run to ``run_dir``. Call :meth:`fit`.

    Args:
        task: what is trained (datasets, model, step, validation).
        run_dir: the run folder.
        settings: the loop's knobs.
        resume: continue the run in ``run_dir`` from ``checkpoints/last.pt`` (a run folder
            whose first checkpoint was never written starts from the beginning).
        progress: tqdm bars (rank 0 only).
        config_text: written to ``RUN/config.yaml`` (the resolved config), when given.
        resume_changes: on resume, the settings that differ from the run's
            (``{key: (old, new)}``); recorded in ``logs/resumes.jsonl``.
    """

    def __init__(
        self,
        task: Task,
        run_dir: str | Path,
        settings: TrainSettings,
        *,
        resume: bool = False,
        progress: bool = True,
        config_text: Optional[str] = None,
        resume_changes: Optional[Mapping[str, Tuple[Any, Any]]] = None,
    ) -> None:
        self.task = task
        self.settings = settings
        self.layout = RunLayout(run_dir)
        self.run_dir = self.layout.root
        self.progress = progress
        self.dist, self.device = init_distributed(settings.device)
        if settings.threads > 0:
            torch.set_num_threads(int(settings.threads))
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        if settings.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(int(settings.seed) + self.dist.rank)
        self.folder = RunFolder(self.layout, self.dist, self.device)  # before anything is read or written there
        try:
            self._setup(resume, config_text, resume_changes or {})
        except OSError as exc:
            self.close()
            raise self.folder.disk_error(exc) from None
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: bool, config_text: Optional[str], changes: Mapping[str, Tuple[Any, Any]]) -> None:
        resume = self.folder.start(resume)
        amp = bool(self.settings.amp) and self.device.type == "cuda"
        self.ctx = EngineContext(device=self.device, dist=self.dist, run=self.layout, progress=self.progress, amp=amp)
        self.task.setup(self.ctx)  # datasets and model: the task's random draws happen here, after seeding
        self.model = self.task.model
        self.metric = self.task.metric
        self.guard = DivergenceGuard(self.task, self.ctx, self.settings.max_loss)
        self.stepper = Stepper(self.task, self.ctx, self.guard)
        self.signals = StopSignals(announce=self.dist.main)
        self.steps_per_epoch = batches_per_epoch(
            len(self.task.train_set), int(self.settings.batch_size), self.dist.world
        )
        self.start_epoch, self.global_step, self.best = 0, 0, -math.inf
        self._saved_step = 0  # global_step of the last save
        self._resumed: Optional[Resumed] = None  # until the first epoch has taken it up
        if resume:
            self._resume(changes)
        self.folder.write_files(config_text, self.task.classes, defer_config=resume and bool(changes))
        self.writer = self.folder.tensorboard(purge_step=self.global_step + 1 if resume else None)

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer of the current phase."""
        return self.stepper.optimizer

    # ----------------------------------------------------------------- the loop
    def fit(self) -> Dict[str, Any]:
        """Train from where the run stands to ``settings.epochs``. Returns ``{"run",
        "best_<metric>", "epochs", "history"}`` (history: the metrics.jsonl rows of the
        epochs run here). SIGTERM / SIGINT save ``last.pt`` after the current step and raise
        :class:`TrainingStopped`."""
        epochs = int(self.settings.epochs)
        history: List[Dict[str, Any]] = []
        try:
            with self.signals:
                if self.dist.main:
                    self.layout.truncate_metrics(self.start_epoch)
                for epoch in range(self.start_epoch, epochs):
                    history.append(self._run_epoch(epoch))
                    if epoch + 1 < epochs and self._agree(self.signals.received is not None):
                        raise self._stopped(epoch + 1, 0)
        except OSError as exc:  # full disk, read-only run folder: one line naming the folder
            raise self.folder.disk_error(exc) from None
        finally:  # also on a divergence stop: TensorBoard flushed, process group left, lock freed
            if self.writer is not None:
                self.writer.close()
            cleanup(self.dist)
            self.close()
        return {
            "run": str(self.run_dir),
            f"best_{self.metric}": None if self.best == -math.inf else self.best,
            "epochs": epochs,
            "history": history,
        }

    def close(self) -> None:
        """Release the run folder (done by :meth:`fit`; call it for a Trainer never fitted)."""
        if self.settings.deterministic:
            torch.use_deterministic_algorithms(self._deterministic_before, warn_only=True)
        self.folder.release()

    def _run_epoch(self, epoch: int) -> Dict[str, Any]:
        """Epoch ``epoch`` (0-based): train, validate, save, log. Returns its metrics row."""
        tally, last_batch = self._train_epoch(epoch)
        train_time = tally.elapsed()
        tally.all_reduce(self.dist, self.device)  # epoch means over every rank's batches
        scores = self._validate(epoch)
        value = None if scores is None else scores.get(self.metric)
        row: Dict[str, Any] = {"epoch": epoch + 1, "phase": self.stepper.phase.name, "lr": self.stepper.lr}
        row.update(tally.means())
        row[f"val_{self.metric}"] = value
        row.update({f"val_{k}": v for k, v in (scores or {}).items() if k != self.metric})
        row["seconds"] = round(train_time, 2)
        self._save_epoch_end(epoch, row, value, last_batch)
        if self.dist.main:
            self.layout.append_metrics(row)
            if self.writer is not None:
                if value is not None:
                    self.writer.add_scalar(f"val/{self.metric}", value, epoch + 1)
                self.writer.add_scalar("train/epoch_loss", row["loss"], epoch + 1)
                self.writer.flush()
            shown = f", val {self.task.metric_label} {100 * value:.2f}" if value is not None else ""
            log.info(
                "epoch %d/%d: loss %.4f%s (%.1fs)", epoch + 1, int(self.settings.epochs), row["loss"], shown, train_time
            )
        barrier(self.dist)
        return row

    def _train_epoch(self, epoch: int) -> Tuple[EpochTally, Any]:
        """The batches of epoch ``epoch`` from where it stands (a resumed run: from its position).
        Returns the epoch's tally and its last batch. Saves mid-epoch (``checkpoint_every``, a
        stop signal) at the ends of accumulation windows."""
        s, steps = self.settings, self.steps_per_epoch
        resumed, self._resumed = self._resumed, None
        self.stepper.enter_phase(epoch, resumed.state if resumed else None)
        self.task.train_mode(self.model)
        skip = resumed.batch if resumed else 0
        if resumed and not skip:
            restore_rng(resumed.rng, self.dist)  # an epoch end: before the new epoch draws anything
        batches = iter(self._loader(epoch, skip))
        if resumed and skip:
            restore_rng(resumed.rng, self.dist)  # mid-epoch: after the loader drew its seed, as it had then
        tally = EpochTally.resumed(resumed.progress if resumed else None)
        batch = None
        with tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{s.epochs} ({self.stepper.phase.name})",
                  unit="batch", disable=not (self.progress and self.dist.main), leave=False) as bar:  # fmt: skip
            for it in range(skip, steps):
                batch = self._next_batch(batches, epoch, it, tally, batch)
                tally.add(self._step(batch, epoch, it))
                bar.update(1)
                bar.set_postfix(loss=f"{tally.sums['loss'] / tally.n:.4f}")
                if it + 1 < steps and self.stepper.window_end(it, steps):
                    stop = self._agree(self.signals.received is not None)
                    due = s.checkpoint_every > 0 and self.global_step - self._saved_step >= int(s.checkpoint_every)
                    if stop or due:
                        self._save_position(epoch, it + 1, tally, batch)
                    if stop:
                        raise self._stopped(epoch, it + 1)
        tally.stop_clock()
        return tally, batch

    def _step(self, batch: Any, epoch: int, it: int) -> Dict[str, float]:
        """Batch ``it`` of epoch ``epoch``: the learning rate, one training step, TensorBoard."""
        self.stepper.set_lr(epoch + it / max(self.steps_per_epoch, 1))
        self.global_step += 1
        record = self.stepper.training_step(batch, epoch, it, self.steps_per_epoch, self.global_step)
        if self.writer is not None and self.global_step % max(1, int(self.settings.log_every)) == 0:
            for k, v in record.items():
                self.writer.add_scalar(f"train/{k}", v, self.global_step)
        return record

    def _validate(self, epoch: int) -> Optional[Dict[str, float]]:
        """The task's scores when epoch ``epoch`` validates (``val_every``, the last epoch), else None."""
        s = self.settings
        if not (s.val_every > 0 and ((epoch + 1) % s.val_every == 0 or epoch + 1 == int(s.epochs))):
            return None
        # deterministic: validation draws nothing from the training generators
        with preserved_rng(self.device.type == "cuda") if s.deterministic else contextlib.nullcontext():
            scores = self.task.validate(self.ctx)
        self.task.train_mode(self.model)
        return scores

    def _loader(self, epoch: int, skip: int = 0) -> DataLoader:
        """The epoch's loader from batch ``skip`` on."""
        s = self.settings
        return epoch_loader(self.task.train_set, int(s.batch_size), int(s.seed), epoch, rank=self.dist.rank,
                            world=self.dist.world, skip=skip, deterministic=bool(s.deterministic),
                            num_workers=int(s.num_workers), collate_fn=self.task.collate_fn,
                            pin_memory=self.device.type == "cuda")  # fmt: skip

    def _next_batch(self, batches: Iterator[Any], epoch: int, it: int, tally: EpochTally, previous: Any) -> Any:
        """The next batch; when a stop signal also ended the loader's workers, save the
        position reached (at a window boundary) and stop."""
        try:
            return next(batches)
        except Exception:
            if self.signals.received is None:
                raise
            saved = it > 0 and it % self.stepper.accumulate == 0 and self.global_step > self._saved_step
            if saved:
                self._save_position(epoch, it, tally, previous)
            raise self._stopped(epoch, it, saved=saved) from None

    # ----------------------------------------------------------------- resume, stop, save
    def _shape(self) -> Dict[str, int]:
        """What a position in an epoch depends on."""
        return {"steps": self.steps_per_epoch, "batch_size": int(self.settings.batch_size), "world": self.dist.world,
                "samples": len(self.task.train_set), "accumulate": self.stepper.accumulate}  # fmt: skip

    def _resume(self, changes: Mapping[str, Tuple[Any, Any]]) -> None:
        """Weights, best score and position from ``last.pt`` (optimizer, generators and the
        epoch's sums are applied when the first epoch reaches them)."""
        r = read_resume(self.layout.checkpoint("last"), self.model, self.metric, self._shape())
        self.start_epoch, self.global_step, self.best, self._saved_step = r.epoch, r.step, r.best, r.step
        self._resumed = r
        if self.stepper.scaler is not None and r.state.get("scaler"):
            self.stepper.scaler.load_state_dict(r.state["scaler"])
        self.task.load_state_dict(r.state.get("task_state") or {})
        self.guard.last_good = r.path
        where = (
            f"epoch {r.epoch + 1}, batch {r.batch}/{self.steps_per_epoch}" if r.batch else f"the end of epoch {r.epoch}"
        )
        self.folder.record_resume(r.path, r.epoch, r.batch, r.step, changes, where)

    def _agree(self, flag: bool) -> bool:
        return any_rank(flag, self.dist, self.device)

    def _stopped(self, epoch: int, batch: int, saved: bool = True) -> TrainingStopped:
        return self.signals.stopped(self.run_dir, epoch, batch, self.steps_per_epoch, self.guard.last_good, saved)

    def _state(self, epoch: int, batch: int, where: str) -> Dict[str, Any]:
        """What ``last.pt`` holds at batch ``batch`` of epoch ``epoch`` (0-based; ``{}`` off rank 0),
        checked for non-finite tensors on every rank first: a diverged state is never saved."""
        model_state, optimizer_state = self.model.state_dict(), self.stepper.optimizer.state_dict()
        self.guard.check_state(
            {"model": model_state, "optimizer": optimizer_state}, epoch if batch else epoch - 1, where
        )
        rng = gather_rng(self.dist)
        if not self.dist.main:
            return {}
        position = {"epoch": epoch, "batch": batch, "step": self.global_step, **self._shape()}
        state = {**self.task.checkpoint_extras(), "model": model_state, "optimizer": optimizer_state,
                 "phase": self.stepper.phase.name, "epoch": epoch, f"best_{self.metric}": self.best,
                 "position": position, "rng": rng, "deterministic": bool(self.settings.deterministic)}  # fmt: skip
        task_state = self.task.state_dict()
        if task_state:
            state["task_state"] = task_state
        if self.stepper.scaler is not None:
            state["scaler"] = self.stepper.scaler.state_dict()
        return state

    def _save_position(self, epoch: int, batch: int, tally: EpochTally, last_batch: Any) -> None:
        """``last.pt`` in the middle of epoch ``epoch`` (0-based) after ``batch`` batches."""
        steps, step = self.steps_per_epoch, self.global_step
        self.guard.check_weights(
            self.model, last_batch, step, epoch, f", batch {batch}/{steps} (step {step}, not saved)"
        )
        state = self._state(epoch, batch, f", batch {batch}/{steps} (not saved)")
        last = self.layout.checkpoint("last")
        if self.dist.main:
            state.update({f"val_{self.metric}": None, "metrics": None, "progress": tally.progress()})
            save_checkpoint(last, state, check_finite=False)  # checked in _state
            self.folder.checkpoint_saved()
        self.guard.last_good, self._saved_step = last, step
        barrier(self.dist)

    def _save_epoch_end(self, epoch: int, row: Dict[str, Any], value: Optional[float], last_batch: Any) -> None:
        """``last.pt`` at the end of epoch ``epoch``; ``best.pt`` (without the optimizer) when the
        metric improves or the task cannot validate. A state with non-finite tensors, or weights
        whose loss explodes, stop the run instead (checked on every rank, so all of them stop)."""
        self.guard.check_weights(self.model, last_batch, self.global_step, epoch, " (not saved)")
        state = self._state(epoch + 1, 0, " (not saved)")
        improved = value is not None and value > self.best
        if improved:
            self.best = float(value)
        last = self.layout.checkpoint("last")
        self.guard.last_good, self._saved_step = last, self.global_step  # rank 0 writes it; every rank names it
        if not self.dist.main:
            return
        state.update({f"best_{self.metric}": self.best, f"val_{self.metric}": value, "metrics": row})
        save_checkpoint(last, state, check_finite=False)  # checked in _state
        self.folder.checkpoint_saved()
        if improved or not self.task.has_validation:
            for key in ("optimizer", "rng", "scaler", "progress"):
                state.pop(key, None)
            save_checkpoint(self.layout.checkpoint("best"), state, check_finite=False)
