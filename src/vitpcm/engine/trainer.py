"""The generic training loop: one :class:`Trainer` runs any :class:`~vitpcm.engine.task.Task`.

What it does for every task:

* processes and devices: DDP under ``torchrun`` (``engine/distributed.py``), one process
  otherwise; AMP on CUDA (bf16 where supported, fp16 with a grad scaler elsewhere);
* data: a shuffled loader per epoch (seeded by ``seed + epoch``; DistributedSampler under
  torchrun), ``drop_last`` only when a rank has at least two full batches;
* phases: at each phase start the task sets the trainable parameters and a *fresh*
  optimizer is built (as the authors recompile the Keras model); the task's schedule sets
  the learning rate before every batch; optional gradient accumulation;
* divergence: the loss is checked *before* ``backward`` on every step (on every rank at
  once under DDP) and a non-finite loss stops the run with one line naming the epoch, the
  step and the last good checkpoint; a state with non-finite tensors is never saved;
* the run folder (through :class:`vitpcm.runs.RunLayout`): ``config.yaml``,
  ``classes.txt``, ``checkpoints/last.pt`` every epoch (atomic), ``checkpoints/best.pt``
  when the task's metric improves, one ``logs/metrics.jsonl`` row per epoch (epoch means
  all-reduced over ranks), TensorBoard when installed, tqdm bars on rank 0;
* ``resume``: weights, epoch, best score and (within the same phase) the optimizer
  state from ``last.pt``; metrics rows of epochs that run again are dropped. An existing
  run without ``resume`` is refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from vitpcm.engine.checkpoint import non_finite_tensors, read_checkpoint, save_checkpoint
from vitpcm.engine.distributed import all_reduce_sum, barrier, cleanup, init_distributed
from vitpcm.engine.task import EngineContext, Phase, Task, count_parameters
from vitpcm.errors import VitpcmError
from vitpcm.io import write_text_atomic
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


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    """Runs ``task`` as ``settings`` say, writing the run to ``run_dir``. Call :meth:`fit`.

    Args:
        task: what is trained (datasets, model, step, validation).
        run_dir: the run folder.
        settings: the loop's knobs.
        resume: continue the run in ``run_dir`` from ``checkpoints/last.pt``.
        progress: tqdm bars (rank 0 only).
        config_text: written to ``RUN/config.yaml`` (the resolved config), when given.
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
    ) -> None:
        self.task = task
        self.settings = settings
        self.layout = RunLayout(run_dir)
        self.run_dir = self.layout.root
        self.progress = progress
        self.dist, self.device = init_distributed(settings.device)
        if settings.threads > 0:
            torch.set_num_threads(int(settings.threads))
        seed_everything(int(settings.seed) + self.dist.rank)

        last = self.layout.checkpoint("last")
        if last.is_file() and not resume:
            raise VitpcmError(
                f"{self.run_dir} already holds a training run: pass --resume to continue it, or choose another --out"
            )
        if resume and not last.is_file():
            raise VitpcmError(f"--resume: {last} not found, nothing to resume")

        self.use_amp = bool(settings.amp) and self.device.type == "cuda"
        self.ctx = EngineContext(
            device=self.device, dist=self.dist, run=self.layout, progress=progress, amp=self.use_amp
        )
        task.setup(self.ctx)  # datasets and model: the task's random draws happen here, after seeding
        self.model = task.model
        self.scaler = torch.amp.GradScaler("cuda", enabled=not torch.cuda.is_bf16_supported()) if self.use_amp else None
        self.phases: List[Phase] = sorted(task.phases(), key=lambda p: p.start_epoch)
        if not self.phases:
            raise ValueError("the task gives no training phase")
        self.accumulate = max(1, int(task.accumulate_steps()))

        self.metric = task.metric
        self.start_epoch = 0
        self.best = -math.inf
        self.phase: Optional[Phase] = None
        self.lr = float("nan")
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ddp: Optional[torch.nn.Module] = None
        self.saved: Optional[Path] = None  # the last good checkpoint (named in divergence errors)
        self._resume_state: Optional[Dict[str, Any]] = None
        if resume:
            state = read_checkpoint(last)
            self.model.load_state_dict(state["model"])
            self.start_epoch = int(state["epoch"])
            self.best = float(state.get(f"best_{self.metric}", -math.inf))
            self._resume_state = state
            self.saved = last

        if self.dist.main:
            self.layout.checkpoints.mkdir(parents=True, exist_ok=True)
            self.layout.logs.mkdir(parents=True, exist_ok=True)
            if config_text is not None:
                write_text_atomic(self.layout.config, config_text)
            if task.classes is not None:
                write_text_atomic(self.layout.classes, "\n".join(task.classes) + "\n")
        self.writer = self._tensorboard()

    # ----------------------------------------------------------------- setup helpers
    def _tensorboard(self):
        if not self.dist.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: metrics.jsonl still has everything
            log.info("tensorboard is not installed; logging to metrics.jsonl only")
            return None
        return SummaryWriter(log_dir=str(self.layout.logs))

    def _loader(self, epoch: int) -> DataLoader:
        s = self.settings
        bs = int(s.batch_size)
        data = self.task.train_set
        if self.dist.enabled:
            sampler = DistributedSampler(data, self.dist.world, self.dist.rank, shuffle=True, seed=int(s.seed))
            sampler.set_epoch(epoch)
        else:
            gen = torch.Generator().manual_seed(int(s.seed) + epoch)
            sampler = RandomSampler(data, generator=gen)
        per_rank = math.ceil(len(data) / self.dist.world)
        return DataLoader(
            data,
            batch_size=bs,
            sampler=sampler,
            num_workers=int(s.num_workers),
            collate_fn=self.task.collate_fn,
            drop_last=per_rank >= 2 * bs,  # keep every image of a tiny set; else even batches
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=_seed_worker,
        )

    def _phase_at(self, epoch: int) -> Phase:
        current = self.phases[0]
        for phase in self.phases:
            if phase.start_epoch <= epoch:
                current = phase
        return current

    def _enter_phase(self, epoch: int) -> None:
        """Set the trainable parameters and make a fresh optimizer when the phase changes."""
        phase = self._phase_at(epoch)
        if self.phase is not None and phase.name == self.phase.name:
            return
        self.phase = phase
        self.lr = float(phase.lr)
        groups = self.task.param_groups(phase, self.model)
        for group in groups:
            group["lr"] = self.lr * float(group.get("lr_scale", 1.0))
        self.optimizer = self.task.make_optimizer(phase, groups)
        state = self._resume_state
        if state is not None and state.get("phase") == phase.name and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self._resume_state = None
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.ddp = self.model
        if self.dist.main:
            log.info("epoch %d: phase %s, lr %.2e, %d trainable parameters", epoch + 1, phase.name, self.lr,
                     count_parameters(groups))  # fmt: skip

    def _set_lr(self, progress: float) -> None:
        """Ask the task for the base lr at ``progress`` (epochs) and apply it to every group."""
        lr = self.task.lr_at(self.phase, progress)
        if lr is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))
        self.lr = float(lr)

    # ----------------------------------------------------------------- one batch
    def _diverged(self, what: str, epoch: int, where: str) -> VitpcmError:
        if self.saved is not None:
            last = (
                f"the last good checkpoint is {self.saved} (continue from it with --resume and a lower learning rate)"
            )
        else:
            last = "no checkpoint was written yet"
        return VitpcmError(f"{what} at epoch {epoch + 1}{where}: {self.task.divergence_hint()}; {last}")

    def _backward_step(self, batch: Any, epoch: int, it: int, steps: int, global_step: int) -> Dict[str, float]:
        """Forward (through the task), the finiteness check, backward, and the optimizer step
        at the end of each accumulation window. Returns the batch's float terms."""
        window_end = (it + 1) % self.accumulate == 0 or it + 1 == steps
        if it % self.accumulate == 0:
            self.optimizer.zero_grad(set_to_none=True)
        # between accumulated batches DDP need not all-reduce gradients
        sync = contextlib.nullcontext() if window_end or not self.dist.enabled else self.ddp.no_sync()
        with sync:
            loss, terms = self.task.train_step(self.ddp, batch, self.ctx)
            check = loss.detach().float().reshape(1)
            if self.dist.enabled:  # every rank stops together (a lone raise would hang the others)
                check = all_reduce_sum(check.clone(), self.dist)
            if not bool(torch.isfinite(check).all()):
                value = loss.detach().float().item()
                what = (
                    f"the loss became {value}"
                    if not math.isfinite(value)
                    else "the loss became non-finite on another rank"
                )
                raise self._diverged(what, epoch, f", batch {it + 1}/{steps} (step {global_step})")
            scaled = loss / self.accumulate if self.accumulate > 1 else loss
            if self.scaler is not None and self.scaler.is_enabled():
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if window_end:
            if self.scaler is not None and self.scaler.is_enabled():
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        record = {k: float(v) for k, v in terms.items()}
        record["loss"] = float(loss.detach())
        return record

    # ----------------------------------------------------------------- loop
    def fit(self) -> Dict[str, Any]:
        """Train from ``start_epoch`` to ``settings.epochs``. Returns ``{"run", "best_<metric>",
        "epochs", "history"}`` (history: the metrics.jsonl rows of the epochs run here)."""
        try:
            history = self._epochs()
        finally:  # also on a divergence stop: TensorBoard flushed, process group left
            if self.writer is not None:
                self.writer.close()
            cleanup(self.dist)
        return {
            "run": str(self.run_dir),
            f"best_{self.metric}": None if self.best == -math.inf else self.best,
            "epochs": int(self.settings.epochs),
            "history": history,
        }

    def _epochs(self) -> List[Dict[str, Any]]:
        from tqdm import tqdm

        s = self.settings
        epochs = int(s.epochs)
        key = f"val_{self.metric}"
        if self.dist.main:
            self.layout.truncate_metrics(self.start_epoch)
        history: List[Dict[str, Any]] = []
        global_step = self.start_epoch * max(1, len(self._loader(0)))
        for epoch in range(self.start_epoch, epochs):
            self._enter_phase(epoch)
            self.task.train_mode(self.model)
            loader = self._loader(epoch)
            sums: Dict[str, float] = {}
            n = 0
            t0 = time.time()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs} ({self.phase.name})", unit="batch",
                       disable=not (self.progress and self.dist.main), leave=False)  # fmt: skip
            steps = len(loader)
            for it, batch in enumerate(bar):
                self._set_lr(epoch + it / max(steps, 1))
                global_step += 1
                record = self._backward_step(batch, epoch, it, steps, global_step)
                n += 1
                for k, v in record.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
                if self.writer is not None and global_step % max(1, int(s.log_every)) == 0:
                    for k, v in record.items():
                        self.writer.add_scalar(f"train/{k}", v, global_step)
            bar.close()
            train_time = time.time() - t0
            if self.dist.enabled:  # epoch means over every rank's batches
                keys = sorted(sums)
                packed = all_reduce_sum(
                    torch.tensor([sums[k] for k in keys] + [n], dtype=torch.float64, device=self.device), self.dist
                )
                sums = dict(zip(keys, packed[:-1].tolist()))
                n = int(packed[-1].item())
            scores: Optional[Dict[str, float]] = None
            if s.val_every > 0 and ((epoch + 1) % s.val_every == 0 or epoch + 1 == epochs):
                scores = self.task.validate(self.ctx)
                self.task.train_mode(self.model)
            value = None if scores is None else scores.get(self.metric)
            row: Dict[str, Any] = {"epoch": epoch + 1, "phase": self.phase.name, "lr": self.lr}
            row.update({k: v / max(n, 1) for k, v in sums.items()})
            row[key] = value
            row.update({f"val_{k}": v for k, v in (scores or {}).items() if k != self.metric})
            row["seconds"] = round(train_time, 2)
            history.append(row)
            self._checkpoint(epoch, row, value)
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
        return history

    def _checkpoint(self, epoch: int, row: Dict[str, Any], value: Optional[float]) -> None:
        """``last.pt`` every epoch; ``best.pt`` (without the optimizer) when the metric improves
        or the task cannot validate. A state with non-finite tensors stops the run instead
        (checked on every rank, so all of them stop)."""
        model_state = self.model.state_dict()
        optimizer_state = self.optimizer.state_dict()
        bad = non_finite_tensors({"model": model_state, "optimizer": optimizer_state})
        if bad:
            raise self._diverged(f"the weights became non-finite ({bad[0]}{' and more' if len(bad) > 1 else ''})",
                                 epoch, " (not saved)")  # fmt: skip
        improved = value is not None and value > self.best
        if improved:
            self.best = float(value)
        last = self.layout.checkpoint("last")
        if not self.dist.main:
            self.saved = last  # rank 0 writes it; every rank names it in errors
            return
        state = {
            **self.task.checkpoint_extras(),
            "model": model_state,
            "optimizer": optimizer_state,
            "phase": self.phase.name,
            "epoch": epoch + 1,
            f"best_{self.metric}": self.best,
            f"val_{self.metric}": value,
            "metrics": row,
        }
        save_checkpoint(last, state, check_finite=False)  # checked above
        self.saved = last
        if improved or not self.task.has_validation:
            state.pop("optimizer")
            save_checkpoint(self.layout.checkpoint("best"), state, check_finite=False)
