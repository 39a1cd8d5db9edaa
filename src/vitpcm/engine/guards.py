"""Divergence guards: the loss before backward, the weights and the state before a save."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from vitpcm.engine.checkpoint import non_finite_tensors
from vitpcm.engine.distributed import all_reduce_sum
from vitpcm.engine.sampling import preserved_rng
from vitpcm.engine.task import EngineContext, Task, eval_mode
from vitpcm.errors import VitpcmError


class DivergenceGuard:
    """Stops a diverging run with one line naming the epoch, the batch and the last good
    checkpoint, on every rank at once under DDP (a lone raise would hang the others).

    Args:
        task: gives the hint that ends the line (:meth:`Task.divergence_hint`) and the step
            that :meth:`check_weights` runs.
        ctx: device and ranks.
        max_loss: a finite loss above this counts as divergence (0 = no limit).

    Attributes:
        last_good: the last checkpoint written (set by the trainer after each save).
    """

    def __init__(self, task: Task, ctx: EngineContext, max_loss: float = 0.0) -> None:
        self.task = task
        self.ctx = ctx
        self.limit = float(max_loss or 0.0)
        self.last_good: Optional[Path] = None

    def error(self, what: str, epoch: int, where: str) -> VitpcmError:
        """``what`` happened in epoch ``epoch`` (0-based) at ``where`` (", batch 3/10 ...")."""
        if self.last_good is not None:
            last = f"the last good checkpoint is {self.last_good} (continue from it with --resume and a lower learning rate)"
        else:
            last = "no checkpoint was written yet"
        return VitpcmError(f"{what} at epoch {epoch + 1}{where}: {self.task.divergence_hint()}; {last}")

    def _any_rank_bad(self, value: torch.Tensor, limit: float) -> bool:
        """Whether ``value`` (one float) is non-finite or above ``limit`` (> 0) on any rank."""
        bad = ~torch.isfinite(value)
        if limit > 0:
            bad = bad | (value.abs() > limit)
        check = bad.float()
        if self.ctx.dist.enabled:
            check = all_reduce_sum(check.clone(), self.ctx.dist)
        return bool(check.item() > 0)

    def check_loss(self, loss: torch.Tensor, epoch: int, where: str) -> None:
        """Before ``backward``: the loss must be finite (and, with ``max_loss``, under it)."""
        limit = self.limit
        value = loss.detach().float().reshape(1)
        if not self._any_rank_bad(value, limit):
            return
        mine = float(value.item())
        if not math.isfinite(mine):
            what = f"the loss became {mine}"
        elif limit > 0 and abs(mine) > limit:
            what = f"the loss reached {mine:.4g}, above the limit {limit:g} (train.max_loss)"
        elif limit > 0:
            what = f"the loss became non-finite or above {limit:g} (train.max_loss) on another rank"
        else:
            what = "the loss became non-finite on another rank"
        raise self.error(what, epoch, where)

    def check_weights(self, model: nn.Module, last_batch: Any, step: int, epoch: int, where: str) -> None:
        """With ``max_loss``: the weights about to be saved must still give a loss under it on
        the last batch. The loss of a step is checked before its update, so without this an
        exploding last update (finite weights, a loss of 1e11 on the next forward) would
        become the "last good" checkpoint. One forward without gradient, in eval mode (no
        dropout, no batch-norm statistics), the random generators left as they were."""
        limit = self.limit
        if limit <= 0 or last_batch is None:
            return
        with torch.no_grad(), preserved_rng(self.ctx.device.type == "cuda"), eval_mode(model):
            loss, _ = self.task.train_step(model, last_batch, self.ctx)
        value = loss.detach().float().reshape(1)
        if self._any_rank_bad(value, limit):
            mine = float(value.item())
            what = (
                f"the weights after step {step} give a loss of {mine:.4g} on its batch, above the limit"
                f" {limit:g} (train.max_loss)"
                if not (math.isfinite(mine) and abs(mine) <= limit)
                else "the weights diverged on another rank"
            )
            raise self.error(what, epoch, where)

    def check_state(self, tensors: Mapping[str, Any], epoch: int, where: str) -> None:
        """A state with non-finite tensors (``{"model": ..., "optimizer": ...}``) is never saved."""
        bad = non_finite_tensors(tensors)
        if bad:
            raise self.error(
                f"the weights became non-finite ({bad[0]}{' and more' if len(bad) > 1 else ''})", epoch, where
            )
