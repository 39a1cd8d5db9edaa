"""What a trainable model plugs into the engine with: a :class:`Task`.

The :class:`~vitpcm.engine.trainer.Trainer` owns everything that is the same for every
model (processes, devices, AMP, the data loader and its sampler, optimizer steps, gradient
accumulation, phases, checkpoints, resume, divergence checks, metrics.jsonl, TensorBoard,
progress bars). A task owns what is not: its datasets, its model, its parameter groups and
optimizer, its learning-rate schedule, one training step and its validation.

The trainer calls a task in this order::

    task.setup(ctx)                      once: datasets, model (on ctx.device), classes
    task.phases()                        once: [Phase(name, start_epoch, lr), ...]
    per phase:   groups = task.param_groups(phase, model)       sets requires_grad
                 opt    = task.make_optimizer(phase, groups)    (each group's "lr" filled in)
                 on resume: opt.load_state_dict(task.migrate_optimizer_state(saved))
    per epoch:   task.train_mode(model)                         model.train(), or frozen parts kept
      per batch: lr     = task.lr_at(phase, progress)           None: leave the lr alone
                 loss, terms = task.train_step(model_for_forward, batch, ctx)
      then:      scores = task.validate(ctx)                    {"miou": ..} or None
                 task.checkpoint_extras()                       "arch", "classes", "config", ...
                 task.state_dict()                              optional, {} by default
    on resume:   task.load_state_dict(state)                    after setup

The trainer keeps what makes a resume exact for every task (docs/reliability.md): the
position in the epoch, the step, the random generators, and (``train.deterministic``)
per-item seeds for whatever the dataset draws; a task only adds what is its own.

A step returns the loss *tensor* (the trainer checks it is finite before ``backward``,
scales it for accumulation and AMP, and steps the optimizer) and a dict of float terms
that are averaged per epoch into metrics.jsonl. ``progress`` is in epochs, fractional
within an epoch (``epoch + batch / batches``), so per-iteration schedules (poly) work:
a task trained for N iterations converts N into epochs of ``ceil(len(train_set) /
batch)`` batches and its schedule into ``progress / epochs``.

Param groups may carry ``"lr_scale"`` (e.g. 10 on a DeepLab head): the trainer sets each
group's ``lr`` to ``base_lr * lr_scale`` at the phase start and at every :meth:`Task.lr_at`.

This module imports torch only; tasks live in :mod:`vitpcm.tasks`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from vitpcm.engine.distributed import Dist
    from vitpcm.runs import RunLayout


@dataclass(frozen=True)
class Phase:
    """One stretch of training with its own trainable parameters and a fresh optimizer.

    Args:
        name: shown in logs, metrics.jsonl ("phase") and stored in checkpoints.
        start_epoch: first epoch (0-based) of the phase; the phase lasts until the next
            phase's start. Phases are given in order of ``start_epoch``; of two phases with
            the same start the later one wins (a zero-length phase is skipped).
        lr: base learning rate at the phase start (before :meth:`Task.lr_at`).
    """

    name: str
    start_epoch: int
    lr: float


@dataclass
class EngineContext:
    """What the trainer hands to a task: where it runs and where the run is written.

    ``dist`` tells the rank and world size (``dist.main`` is rank 0: the only one that
    writes files and shows progress); ``amp`` is True only on CUDA with ``amp`` asked for.
    """

    device: torch.device
    dist: "Dist"
    run: "RunLayout"
    progress: bool = True
    amp: bool = False

    def autocast(self) -> ContextManager[Any]:
        """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op elsewhere."""
        return autocast(self.device, self.amp)

    @property
    def show_progress(self) -> bool:
        """Progress bars only on rank 0 and when asked for."""
        return bool(self.progress and self.dist.main)


def autocast(device: torch.device, enabled: bool) -> ContextManager[Any]:
    """``torch.autocast`` on CUDA (bf16 where the GPU supports it, else fp16), else a no-op."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Temporarily switch ``model`` to eval mode (no dropout), restoring its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------ schedules
def cosine_lr(base: float, t: float, floor: float = 0.01) -> float:
    """Cosine decay from ``base`` (t=0) to ``floor * base`` (t=1); ``t`` is clipped to [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


def poly_lr(base: float, t: float, power: float = 0.9) -> float:
    """DeepLab's poly decay ``base * (1 - t) ** power``; ``t`` is clipped to [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    return base * (1.0 - t) ** power


# ------------------------------------------------------------------------------ the task
class Task:
    """Base class of a trainable model for the engine. Override what your model needs.

    Required: :meth:`setup` (set :attr:`model`, :attr:`train_set`), :meth:`phases`,
    :meth:`train_step`. The defaults give one phase with every parameter trainable, Adam,
    a constant learning rate, no validation and no gradient accumulation.

    Attributes set by :meth:`setup`:
        model: the ``nn.Module`` being trained, already on ``ctx.device``.
        train_set: a map-style dataset; batches are made with :attr:`collate_fn`.
        classes: class names written to ``RUN/classes.txt`` (``None``: no file).
    """

    #: name of the score :meth:`validate` returns that decides ``best.pt`` (higher is better)
    metric: str = "miou"
    #: how that score is shown in the log line (as a percentage)
    metric_label: str = "mIoU"

    model: nn.Module
    train_set: Any
    classes: Optional[List[str]] = None
    collate_fn: Optional[Callable[[List[Any]], Any]] = None

    def setup(self, ctx: EngineContext) -> None:
        """Build datasets and the model (on ``ctx.device``). Called once, after seeding, on
        every rank; the random draws of model initialisation happen here."""
        raise NotImplementedError

    # -- phases and optimizers ----------------------------------------------------------
    def phases(self) -> List[Phase]:
        """The training phases in order (default: one phase ``"train"`` at lr 1e-3)."""
        return [Phase("train", 0, 1e-3)]

    def param_groups(self, phase: Phase, model: nn.Module) -> List[Dict[str, Any]]:
        """Set ``requires_grad`` for ``phase`` and return the optimizer's parameter groups
        (``{"params": [...], "lr_scale": 1.0, ...}``; the trainer fills in ``lr``).
        Default: every parameter, one group."""
        for p in model.parameters():
            p.requires_grad_(True)
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def make_optimizer(self, phase: Phase, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
        """A fresh optimizer over ``groups`` (each with its ``lr``). Default: Adam."""
        return torch.optim.Adam(groups)

    def migrate_optimizer_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """A checkpoint's optimizer state made to fit this version's parameter groups before
        ``--resume`` loads it (default: as it is)."""
        return state

    def lr_at(self, phase: Phase, progress: float) -> Optional[float]:
        """Base learning rate before the batch at ``progress`` (epochs, fractional), or None
        to leave it unchanged. Default: constant."""
        return None

    def train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode (before each epoch and after validation). Override
        to keep parts frozen in eval mode, e.g. DeepLabV2's batch norm."""
        model.train()

    def accumulate_steps(self) -> int:
        """Batches whose gradients are summed before one optimizer step (default 1). The
        loss of each batch is divided by this, so the step sees the mean gradient."""
        return 1

    # -- one step -----------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Any, ctx: EngineContext) -> Tuple[torch.Tensor, Mapping[str, float]]:
        """Forward one batch and return ``(loss, terms)``.

        Args:
            model: the module to call for the gradient-carrying forward (the DDP wrapper
                under torchrun; :attr:`model` itself otherwise). Use :attr:`model` for
                forwards that need no gradient synchronisation (e.g. eval-mode targets).
            batch: what the train loader yields (``collate_fn`` of the dataset's items),
                still on the CPU.
            ctx: device, rank, ``ctx.autocast()``.

        Returns:
            ``loss``: a scalar tensor to minimise (no ``backward`` here);
            ``terms``: float values averaged per epoch into metrics.jsonl (the trainer adds
            ``"loss"`` itself).

        Before a checkpoint is saved (with ``max_loss``) the trainer calls this once more on
        the last batch, under ``torch.no_grad()`` with the model in eval mode, to check that
        the weights about to be saved have not exploded: keep it free of side effects beyond
        the returned values.
        """
        raise NotImplementedError

    # -- validation and checkpoints -----------------------------------------------------
    @property
    def has_validation(self) -> bool:
        """Whether :meth:`validate` can score the model. Without it ``best.pt`` is written
        every epoch (it is then the last epoch)."""
        return False

    def validate(self, ctx: EngineContext) -> Optional[Dict[str, float]]:
        """Score :attr:`model` (every rank takes part; results all-reduced) and return a
        dict holding :attr:`metric`, or None when there is nothing to score. The trainer
        puts the model back in train mode afterwards."""
        return None

    def checkpoint_extras(self) -> Dict[str, Any]:
        """Entries stored in every checkpoint beside the weights: at least ``"arch"`` (what
        :func:`vitpcm.models.registry.create_model` rebuilds the model from); usually
        ``"classes"`` and ``"config"`` too."""
        return {"arch": {"name": type(self.model).__name__}}

    def divergence_hint(self) -> str:
        """What to try when the loss is not finite (ends the error line)."""
        return "lower the learning rate or check the data"

    # -- optional: state of the task itself ----------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What the task must carry across a resume besides the model, the optimizer, the
        position in the data and the random generators (all kept by the trainer). Stored in
        every checkpoint when not empty. Default: nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`state_dict` returned (called on resume, after :meth:`setup`)."""


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(groups: Iterable[Mapping[str, Any]]) -> int:
    """Number of scalars in optimizer parameter groups."""
    return sum(p.numel() for g in groups for p in g["params"])


__all__: Sequence[str] = (
    "Task",
    "Phase",
    "EngineContext",
    "autocast",
    "eval_mode",
    "cosine_lr",
    "poly_lr",
    "trainable_parameters",
    "count_parameters",
)
