"""One training step of a task: its phase's optimizer and learning rate, forward, backward, update."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from vitpcm.engine.guards import DivergenceGuard
from vitpcm.engine.task import EngineContext, Phase, Task, count_parameters

log = logging.getLogger(__name__)


class Stepper:
    """Trains ``task.model`` one batch at a time; the :class:`~vitpcm.engine.trainer.Trainer`
    calls it for every batch, and benchmarks use it alone (no run folder, no data loader).

    At each phase start (:meth:`enter_phase`) the task sets the trainable parameters and a
    *fresh* optimizer is built (as the authors recompile the Keras model), wrapped in DDP under
    torchrun. :meth:`training_step` runs the task's step, checks the loss before ``backward``
    (:class:`~vitpcm.engine.guards.DivergenceGuard`), scales it for gradient accumulation and
    AMP (a grad scaler with fp16, i.e. on CUDA without bf16), and steps the optimizer at the
    end of each accumulation window.

    Args:
        task: set up (``task.model`` on ``ctx.device``).
        ctx: device, ranks, AMP.
        guard: checks the loss of every step.

    Attributes:
        phase, lr, optimizer: the current phase, its base learning rate and optimizer.
        ddp: what the forward goes through (the model under DDP; the model in one process).
        scaler: the AMP grad scaler (None without AMP).
        accumulate: batches per optimizer step (``task.accumulate_steps()``).
    """

    def __init__(self, task: Task, ctx: EngineContext, guard: DivergenceGuard) -> None:
        self.task = task
        self.ctx = ctx
        self.guard = guard
        self.model = task.model
        self.scaler = torch.amp.GradScaler("cuda", enabled=not torch.cuda.is_bf16_supported()) if ctx.amp else None
        self.phases: List[Phase] = sorted(task.phases(), key=lambda p: p.start_epoch)
        if not self.phases:
            raise ValueError("the task gives no training phase")
        self.accumulate = max(1, int(task.accumulate_steps()))
        self.phase: Optional[Phase] = None
        self.lr = float("nan")
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ddp: Optional[torch.nn.Module] = None

    def phase_at(self, epoch: int) -> Phase:
        """The phase epoch ``epoch`` (0-based) belongs to."""
        current = self.phases[0]
        for phase in self.phases:
            if phase.start_epoch <= epoch:
                current = phase
        return current

    def enter_phase(self, epoch: int, saved: Optional[Mapping[str, Any]] = None) -> None:
        """Set the trainable parameters and make a fresh optimizer when epoch ``epoch`` starts
        another phase. ``saved``: a checkpoint (resume) whose optimizer state is loaded when it
        was saved in the phase entered (the learning rate stays this run's)."""
        phase = self.phase_at(epoch)
        if self.phase is not None and phase.name == self.phase.name:
            return
        self.phase = phase
        self.lr = float(phase.lr)
        groups = self.task.param_groups(phase, self.model)
        for group in groups:
            group["lr"] = self.lr * float(group.get("lr_scale", 1.0))
        self.optimizer = self.task.make_optimizer(phase, groups)
        if saved is not None and saved.get("phase") == phase.name and "optimizer" in saved:
            self.optimizer.load_state_dict(self.task.migrate_optimizer_state(saved["optimizer"]))
            for group in self.optimizer.param_groups:  # the lr of this run (it may be a changed one)
                group["lr"] = self.lr * float(group.get("lr_scale", 1.0))
        dist, device = self.ctx.dist, self.ctx.device
        if dist.enabled:
            self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.ddp = self.model
        if dist.main:
            log.info("epoch %d: phase %s, lr %.2e, %d trainable parameters", epoch + 1, phase.name, self.lr,
                     count_parameters(groups))  # fmt: skip

    def set_lr(self, progress: float) -> None:
        """Ask the task for the base lr at ``progress`` (epochs) and apply it to every group."""
        lr = self.task.lr_at(self.phase, progress)
        if lr is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))
        self.lr = float(lr)

    def window_end(self, it: int, steps: int) -> bool:
        """Whether batch ``it`` (0-based) of ``steps`` ends an accumulation window."""
        return (it + 1) % self.accumulate == 0 or it + 1 == steps

    def training_step(self, batch: Any, epoch: int, it: int, steps: int, global_step: int) -> Dict[str, float]:
        """Batch ``it`` (0-based) of the ``steps`` of epoch ``epoch``, step ``global_step`` of
        the run (both named in a divergence error): forward (through the task), the loss
        guard, backward, and the optimizer step at the end of each accumulation window.
        Returns the batch's float terms and ``"loss"``."""
        window_end = self.window_end(it, steps)
        if it % self.accumulate == 0:
            self.optimizer.zero_grad(set_to_none=True)
        # between accumulated batches DDP need not all-reduce gradients
        sync = contextlib.nullcontext() if window_end or not self.ctx.dist.enabled else self.ddp.no_sync()
        amp_scaled = self.scaler is not None and self.scaler.is_enabled()
        with sync:
            loss, terms = self.task.train_step(self.ddp, batch, self.ctx)
            self.guard.check_loss(loss, epoch, f", batch {it + 1}/{steps} (step {global_step})")
            scaled = loss / self.accumulate if self.accumulate > 1 else loss
            if amp_scaled:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if window_end:
            if amp_scaled:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        record = {k: float(v) for k, v in terms.items()}
        record["loss"] = float(loss.detach())
        return record
