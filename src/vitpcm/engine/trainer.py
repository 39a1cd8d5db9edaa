"""The generic training loop: one :class:`Trainer` runs any :class:`~vitpcm.engine.task.Task`.

What it does for every task:

* processes and devices: DDP under ``torchrun`` (``engine/distributed.py``), one process
  otherwise; AMP on CUDA (bf16 where supported, fp16 with a grad scaler elsewhere);
* data: a shuffled loader per epoch (the order of ``RandomSampler`` seeded ``seed + epoch``,
  ``DistributedSampler``'s under torchrun; :class:`~vitpcm.engine.sampling.EpochSampler`),
  ``drop_last`` only when a rank has at least two full batches;
* phases: at each phase start the task sets the trainable parameters and a *fresh*
  optimizer is built (as the authors recompile the Keras model); the task's schedule sets
  the learning rate before every batch; optional gradient accumulation;
* divergence: the loss is checked *before* ``backward`` on every step (on every rank at
  once under DDP): a non-finite loss, or one above ``max_loss``, stops the run with one
  line naming the epoch, the step and the last good checkpoint; a state with non-finite
  tensors is never saved;
* the run folder (through :class:`vitpcm.runs.RunLayout`): one writer at a time
  (``RUN/.lock``, PID and host; a lock left by a dead process is taken over with a note),
  ``config.yaml``, ``classes.txt``, ``checkpoints/last.pt`` every epoch and every
  ``checkpoint_every`` steps (atomic; model, optimizer, phase, position in the epoch,
  random generators), ``checkpoints/best.pt`` when the task's metric improves, one
  ``logs/metrics.jsonl`` row per epoch (epoch means all-reduced over ranks), TensorBoard
  when installed, tqdm bars on rank 0;
* pre-emption: SIGTERM or SIGINT saves ``last.pt`` after the current step and stops with
  :class:`TrainingStopped` (a second signal acts at once);
* ``resume``: continues from ``last.pt`` exactly where it stopped, mid-epoch too: weights,
  optimizer (same phase), epoch, position in the epoch, step, best score, the epoch's
  running sums and the random generators; metrics rows of epochs that run again are
  dropped. With ``deterministic`` (CPU) a run killed at any moment and resumed ends with
  the weights of an uninterrupted run (docs/reliability.md). An existing run without
  ``resume`` is refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed
from torch.utils.data import DataLoader

from vitpcm.engine.checkpoint import non_finite_tensors, read_checkpoint, save_checkpoint
from vitpcm.engine.distributed import all_reduce_sum, any_rank, barrier, cleanup, init_distributed
from vitpcm.engine.guards import DivergenceGuard
from vitpcm.engine.run_folder import RunFolder
from vitpcm.engine.sampling import batches_per_epoch, epoch_loader, preserved_rng, rng_state, set_rng_state
from vitpcm.engine.signals import StopSignals, TrainingStopped
from vitpcm.engine.step import Stepper
from vitpcm.engine.task import EngineContext, Task
from vitpcm.errors import VitpcmError
from vitpcm.runs import RunLayout

log = logging.getLogger(__name__)


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
            self._init(task, settings, resume, config_text, resume_changes)
        except OSError as exc:
            self.close()
            raise self.folder.disk_error(exc) from None
        except BaseException:
            self.close()
            raise

    def _init(self, task, settings, resume, config_text, resume_changes) -> None:
        resume = self.folder.start(resume)
        last = self.layout.checkpoint("last")

        self.use_amp = bool(settings.amp) and self.device.type == "cuda"
        self.ctx = EngineContext(
            device=self.device, dist=self.dist, run=self.layout, progress=self.progress, amp=self.use_amp
        )
        task.setup(self.ctx)  # datasets and model: the task's random draws happen here, after seeding
        self.model = task.model

        self.metric = task.metric
        self.start_epoch = 0
        self.best = -math.inf
        self.guard = DivergenceGuard(task, self.ctx, settings.max_loss)  # names the last good checkpoint
        self.stepper = Stepper(task, self.ctx, self.guard)  # phases, optimizer, lr, the step
        self.global_step = 0
        self._saved_step = 0
        self._resume_state: Optional[Dict[str, Any]] = None  # optimizer of the resumed phase
        self._position: Optional[Dict[str, Any]] = None  # where the resumed run stopped
        self.signals = StopSignals(announce=self.dist.main)
        if resume:
            self._load_resume(last, resume_changes or {})
        else:
            self.global_step = 0

        self.folder.write_files(config_text, task.classes, defer_config=resume and bool(resume_changes))
        self.writer = self.folder.tensorboard(purge_step=self.global_step + 1 if resume else None)

    # ----------------------------------------------------------------- resume
    def _load_resume(self, last: Path, changes: Mapping[str, Tuple[Any, Any]]) -> None:
        """Read ``last.pt``: weights, best score, position; optimizer, generators and the
        epoch's sums are applied when the loop reaches them."""
        state = read_checkpoint(last)
        bad = non_finite_tensors(state["model"])
        if bad:  # written before vitpcm checked what it saves
            raise VitpcmError(
                f"--resume: {last} holds non-finite weights ({bad[0]}{' and more' if len(bad) > 1 else ''}): the run"
                " had diverged when it was saved; start a new run (lower learning rate) or resume from a copy of an"
                " earlier checkpoint"
            )
        self._load_weights(state["model"], last)
        self.best = float(state.get(f"best_{self.metric}", -math.inf))
        position = dict(state.get("position") or {})
        if not position:  # checkpoints written before positions were stored: an epoch end
            position = {"epoch": int(state["epoch"]), "batch": 0}
        self.start_epoch = int(position["epoch"])
        batch = int(position.get("batch", 0))
        steps = self._steps_per_epoch()
        if batch:
            mismatch = self._position_mismatch(position, steps)
            if mismatch:
                raise VitpcmError(
                    f"--resume: {last} was saved in the middle of epoch {self.start_epoch + 1} with {mismatch}: the"
                    " position in the epoch would not mean the same; resume with the run's own settings"
                )
        self.global_step = int(position.get("step", self.start_epoch * steps + batch))
        self._saved_step = self.global_step
        self._resume_state = state
        self._position = {**position, "batch": batch, "steps": steps, "rng": state.get("rng"),
                          "progress": state.get("progress")}  # fmt: skip
        if self.stepper.scaler is not None and state.get("scaler"):
            self.stepper.scaler.load_state_dict(state["scaler"])
        self.task.load_state_dict(state.get("task_state") or {})
        self.guard.last_good = last
        where = (
            f"epoch {self.start_epoch + 1}, batch {batch}/{steps}" if batch else f"the end of epoch {self.start_epoch}"
        )
        self.folder.record_resume(last, self.start_epoch, batch, self.global_step, changes, where)

    def _position_mismatch(self, position: Mapping[str, Any], steps: int) -> Optional[str]:
        """What differs between a mid-epoch position and this run (None: nothing)."""
        now = {"batch_size": int(self.settings.batch_size), "world": self.dist.world, "samples": len(self.task.train_set),
               "steps": steps, "accumulate": self.stepper.accumulate}  # fmt: skip
        names = {"batch_size": "batch size", "world": "processes", "samples": "training items", "steps": "batches per epoch",
                 "accumulate": "accumulation steps"}  # fmt: skip
        for key, value in now.items():
            if key in position and int(position[key]) != value:
                return f"{names[key]} {position[key]} (now {value})"
        return None

    def _load_weights(self, weights: Mapping[str, torch.Tensor], path: Path) -> None:
        """``load_state_dict`` with one line instead of a size-mismatch line per tensor."""
        try:
            self.model.load_state_dict(weights)
        except RuntimeError:
            own = self.model.state_dict()
            shapes = [k for k, v in weights.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
            missing = [k for k in own if k not in weights]
            unexpected = [k for k in weights if k not in own]
            example = ""
            if shapes:
                k = shapes[0]
                example = f", e.g. {k}: {list(weights[k].shape)} in the checkpoint, {list(own[k].shape)} here"
            raise VitpcmError(
                f"--resume: {path} does not fit the model this config builds ({len(shapes)} tensor(s) of another"
                f" shape{example}; {len(missing)} missing, {len(unexpected)} unexpected): the model settings changed;"
                " resume with the run's own config, or train a new run with another --out"
            ) from None

    # ----------------------------------------------------------------- setup helpers
    def _steps_per_epoch(self) -> int:
        return batches_per_epoch(len(self.task.train_set), int(self.settings.batch_size), self.dist.world)

    def _loader(self, epoch: int, skip: int = 0) -> DataLoader:
        """The epoch's loader from batch ``skip`` on."""
        s = self.settings
        return epoch_loader(self.task.train_set, int(s.batch_size), int(s.seed), epoch, rank=self.dist.rank,
                            world=self.dist.world, skip=skip, deterministic=bool(s.deterministic),
                            num_workers=int(s.num_workers), collate_fn=self.task.collate_fn,
                            pin_memory=self.device.type == "cuda")  # fmt: skip

    # ----------------------------------------------------------------- signals
    def _agree(self, flag: bool) -> bool:
        return any_rank(flag, self.dist, self.device)

    def _stopped(self, epoch: int, batch: int, steps: int, saved: bool = True) -> TrainingStopped:
        return self.signals.stopped(self.run_dir, epoch, batch, steps, self.guard.last_good, saved)

    # ----------------------------------------------------------------- one batch
    # ----------------------------------------------------------------- loop
    def fit(self) -> Dict[str, Any]:
        """Train from where the run stands to ``settings.epochs``. Returns ``{"run",
        "best_<metric>", "epochs", "history"}`` (history: the metrics.jsonl rows of the
        epochs run here). SIGTERM / SIGINT save ``last.pt`` after the current step and raise
        :class:`TrainingStopped`."""
        try:
            with self.signals:
                history = self._epochs()
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
            "epochs": int(self.settings.epochs),
            "history": history,
        }

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer of the current phase."""
        return self.stepper.optimizer

    def close(self) -> None:
        """Release the run folder (done by :meth:`fit`; call it for a Trainer never fitted)."""
        if self.settings.deterministic:
            torch.use_deterministic_algorithms(self._deterministic_before, warn_only=True)
        self.folder.release()

    def _epochs(self) -> List[Dict[str, Any]]:
        from tqdm import tqdm

        s = self.settings
        epochs = int(s.epochs)
        key = f"val_{self.metric}"
        if self.dist.main:
            self.layout.truncate_metrics(self.start_epoch)
        history: List[Dict[str, Any]] = []
        for epoch in range(self.start_epoch, epochs):
            self.stepper.enter_phase(epoch, self._resume_state)
            self._resume_state = None
            self.task.train_mode(self.model)
            position, self._position = self._position, None
            skip = int(position["batch"]) if position else 0
            if position and not skip:
                self._restore_rng(position)  # an epoch end: before the new epoch draws anything
            steps = self._steps_per_epoch()
            batches = iter(self._loader(epoch, skip))
            if position and skip:
                self._restore_rng(position)  # mid-epoch: after the loader drew its seed, as it had then
            sums: Dict[str, float] = {}
            n, seconds = 0, 0.0
            if position and skip and position.get("progress"):
                progress = position["progress"]
                sums, n, seconds = dict(progress["sums"]), int(progress["n"]), float(progress["seconds"])
            t0 = time.time()
            bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{epochs} ({self.stepper.phase.name})",
                       unit="batch", disable=not (self.progress and self.dist.main), leave=False)  # fmt: skip
            batch = None
            for it in range(skip, steps):
                batch = self._next_batch(batches, epoch, it, steps, sums, n, seconds + time.time() - t0, batch)
                self.stepper.set_lr(epoch + it / max(steps, 1))
                self.global_step += 1
                record = self.stepper.training_step(batch, epoch, it, steps, self.global_step)
                n += 1
                for k, v in record.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
                if self.writer is not None and self.global_step % max(1, int(s.log_every)) == 0:
                    for k, v in record.items():
                        self.writer.add_scalar(f"train/{k}", v, self.global_step)
                if it + 1 < steps and self.stepper.window_end(it, steps):
                    stop = self._agree(self.signals.received is not None)
                    due = s.checkpoint_every > 0 and self.global_step - self._saved_step >= int(s.checkpoint_every)
                    if stop or due:
                        self._save_position(epoch, it + 1, steps, sums, n, seconds + time.time() - t0, batch)
                    if stop:
                        bar.close()
                        raise self._stopped(epoch, it + 1, steps)
            bar.close()
            train_time = seconds + (time.time() - t0)
            del batches
            if self.dist.enabled:  # epoch means over every rank's batches
                keys = sorted(sums)
                packed = all_reduce_sum(
                    torch.tensor([sums[k] for k in keys] + [n], dtype=torch.float64, device=self.device), self.dist
                )
                sums = dict(zip(keys, packed[:-1].tolist()))
                n = int(packed[-1].item())
            scores: Optional[Dict[str, float]] = None
            if s.val_every > 0 and ((epoch + 1) % s.val_every == 0 or epoch + 1 == epochs):
                # deterministic: validation draws nothing from the training generators
                guard = preserved_rng(self.device.type == "cuda") if s.deterministic else contextlib.nullcontext()
                with guard:
                    scores = self.task.validate(self.ctx)
                self.task.train_mode(self.model)
            value = None if scores is None else scores.get(self.metric)
            row: Dict[str, Any] = {"epoch": epoch + 1, "phase": self.stepper.phase.name, "lr": self.stepper.lr}
            row.update({k: v / max(n, 1) for k, v in sums.items()})
            row[key] = value
            row.update({f"val_{k}": v for k, v in (scores or {}).items() if k != self.metric})
            row["seconds"] = round(train_time, 2)
            history.append(row)
            self._checkpoint(epoch, row, value, steps, batch)
            if self.dist.main:
                self.layout.append_metrics(row)
                if self.writer is not None:
                    if value is not None:
                        self.writer.add_scalar(f"val/{self.metric}", value, epoch + 1)
                    self.writer.add_scalar("train/epoch_loss", row["loss"], epoch + 1)
                    self.writer.flush()
                shown = f", val {self.task.metric_label} {100 * value:.2f}" if value is not None else ""
                log.info("epoch %d/%d: loss %.4f%s (%.1fs)", epoch + 1, epochs, row["loss"], shown, train_time)
            barrier(self.dist)
            if epoch + 1 < epochs and self._agree(self.signals.received is not None):
                raise self._stopped(epoch + 1, 0, steps)
        return history

    def _next_batch(
        self,
        batches: Iterator[Any],
        epoch: int,
        it: int,
        steps: int,
        sums: Dict[str, float],
        n: int,
        seconds: float,
        previous: Any,
    ) -> Any:
        """The next batch; when a stop signal also ended the loader's workers, save the
        position reached (at a window boundary) and stop."""
        try:
            return next(batches)
        except Exception:
            if self.signals.received is None:
                raise
            saved = False
            if it > 0 and it % self.stepper.accumulate == 0 and self.global_step > self._saved_step:
                self._save_position(epoch, it, steps, sums, n, seconds, previous)
                saved = True
            raise self._stopped(epoch, it, steps, saved=saved) from None

    def _restore_rng(self, position: Mapping[str, Any]) -> None:
        states = position.get("rng")
        if not states:
            return
        if len(states) != self.dist.world:
            if self.dist.main:
                log.warning("--resume: the checkpoint holds the random generators of %d process(es), this run has %d:"
                            " the rest of the run draws other random numbers", len(states), self.dist.world)  # fmt: skip
            return
        set_rng_state(states[self.dist.rank])

    # ----------------------------------------------------------------- checkpoints
    def _gather_rng(self) -> Optional[List[Dict[str, Any]]]:
        """Every rank's generator states, on rank 0 (None elsewhere)."""
        mine = rng_state()
        if not self.dist.enabled:
            return [mine]
        out: Optional[List[Any]] = [None] * self.dist.world if self.dist.main else None
        torch.distributed.gather_object(mine, out, dst=0)
        return out

    def _state(self, epoch_done: int, position: Dict[str, Any]) -> Dict[str, Any]:
        """The common part of a checkpoint (``{}`` off rank 0), checked for non-finite tensors
        on every rank first: a diverged state is never saved."""
        model_state = self.model.state_dict()
        optimizer_state = self.stepper.optimizer.state_dict()
        where = f", batch {position['batch']}/{position['steps']}" if position.get("batch") else ""
        self.guard.check_state({"model": model_state, "optimizer": optimizer_state},
                               position["epoch"] if position.get("batch") else epoch_done - 1, f"{where} (not saved)")  # fmt: skip
        rng = self._gather_rng()
        if not self.dist.main:
            return {}
        state = {
            **self.task.checkpoint_extras(),
            "model": model_state,
            "optimizer": optimizer_state,
            "phase": self.stepper.phase.name,
            "epoch": epoch_done,
            f"best_{self.metric}": self.best,
            "position": position,
            "rng": rng,
            "deterministic": bool(self.settings.deterministic),
        }
        task_state = self.task.state_dict()
        if task_state:
            state["task_state"] = task_state
        if self.stepper.scaler is not None:
            state["scaler"] = self.stepper.scaler.state_dict()
        return state

    def _position_record(self, epoch: int, batch: int, steps: int) -> Dict[str, Any]:
        return {"epoch": epoch, "batch": batch, "step": self.global_step, "steps": steps,
                "batch_size": int(self.settings.batch_size), "world": self.dist.world,
                "samples": len(self.task.train_set), "accumulate": self.stepper.accumulate}  # fmt: skip

    def _save_position(
        self, epoch: int, batch: int, steps: int, sums: Dict[str, float], n: int, seconds: float, last_batch: Any
    ) -> None:
        """``last.pt`` in the middle of epoch ``epoch`` (0-based) after ``batch`` batches."""
        self.guard.check_weights(
            self.model,
            last_batch,
            self.global_step,
            epoch,
            f", batch {batch}/{steps} (step {self.global_step}, not saved)",
        )
        state = self._state(epoch, self._position_record(epoch, batch, steps))
        last = self.layout.checkpoint("last")
        if self.dist.main:
            state.update({f"val_{self.metric}": None, "metrics": None,
                          "progress": {"sums": dict(sums), "n": int(n), "seconds": float(seconds)}})  # fmt: skip
            save_checkpoint(last, state, check_finite=False)  # checked in _state
            self.folder.checkpoint_saved()
        self.guard.last_good = last
        self._saved_step = self.global_step
        barrier(self.dist)

    def _checkpoint(self, epoch: int, row: Dict[str, Any], value: Optional[float], steps: int, last_batch: Any) -> None:
        """``last.pt`` at the end of epoch ``epoch``; ``best.pt`` (without the optimizer) when the
        metric improves or the task cannot validate. A state with non-finite tensors, or weights
        whose loss explodes, stop the run instead (checked on every rank, so all of them stop)."""
        self.guard.check_weights(self.model, last_batch, self.global_step, epoch, " (not saved)")
        state = self._state(epoch + 1, self._position_record(epoch + 1, 0, steps))
        improved = value is not None and value > self.best
        if improved:
            self.best = float(value)
        last = self.layout.checkpoint("last")
        self.guard.last_good = last  # rank 0 writes it; every rank names it in errors
        self._saved_step = self.global_step
        if not self.dist.main:
            return
        state.update({f"best_{self.metric}": self.best, f"val_{self.metric}": value, "metrics": row})
        save_checkpoint(last, state, check_finite=False)  # checked in _state
        self.folder.checkpoint_saved()
        if improved or not self.task.has_validation:
            for key in ("optimizer", "rng", "scaler", "progress"):
                state.pop(key, None)
            save_checkpoint(self.layout.checkpoint("best"), state, check_finite=False)
