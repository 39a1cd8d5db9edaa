"""The training state in ``last.pt``: what a save stores, what a resume reads back from it."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed
import torch.nn as nn

from vitpcm.engine.checkpoint import non_finite_tensors, read_checkpoint
from vitpcm.engine.distributed import Dist, all_reduce_sum
from vitpcm.engine.sampling import rng_state, set_rng_state
from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

#: what a mid-epoch position depends on, as named in the error of a resume that changes it
SHAPE_NAMES = {"batch_size": "batch size", "world": "processes", "samples": "training items",
               "steps": "batches per epoch", "accumulate": "accumulation steps"}  # fmt: skip


@dataclass
class EpochTally:
    """The epoch's running sums of the step terms, their count and the training time (saved
    with a mid-epoch ``last.pt`` as ``progress``, so a resumed epoch reports the whole epoch)."""

    sums: Dict[str, float] = field(default_factory=dict)
    n: int = 0
    seconds: float = 0.0  # before this process took the epoch over (resumed), or all of it (stopped)
    started: Optional[float] = field(default_factory=time.time)  # None: the clock is stopped

    @classmethod
    def resumed(cls, progress: Optional[Mapping[str, Any]]) -> "EpochTally":
        """From a checkpoint's ``progress`` (None: a fresh epoch)."""
        if not progress:
            return cls()
        return cls(dict(progress["sums"]), int(progress["n"]), float(progress["seconds"]))

    def add(self, record: Mapping[str, float]) -> None:
        self.n += 1
        for k, v in record.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def elapsed(self) -> float:
        """Seconds of training in this epoch so far."""
        return self.seconds + (time.time() - self.started if self.started is not None else 0.0)

    def stop_clock(self) -> None:
        """The epoch's batches are done: :meth:`elapsed` stays what it is now."""
        self.seconds, self.started = self.elapsed(), None

    def progress(self) -> Dict[str, Any]:
        """What a mid-epoch checkpoint stores."""
        return {"sums": dict(self.sums), "n": int(self.n), "seconds": float(self.elapsed())}

    def all_reduce(self, dist: Dist, device: torch.device) -> None:
        """Sum over every rank's batches (nothing in one process)."""
        if not dist.enabled:
            return
        keys = sorted(self.sums)
        packed = all_reduce_sum(
            torch.tensor([self.sums[k] for k in keys] + [self.n], dtype=torch.float64, device=device), dist
        )
        self.sums = dict(zip(keys, packed[:-1].tolist()))
        self.n = int(packed[-1].item())

    def means(self) -> Dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


def gather_rng(dist: Dist) -> Optional[List[Dict[str, Any]]]:
    """Every rank's random-generator states, on rank 0 (None elsewhere)."""
    mine = rng_state()
    if not dist.enabled:
        return [mine]
    out: Optional[List[Any]] = [None] * dist.world if dist.main else None
    torch.distributed.gather_object(mine, out, dst=0)
    return out


def restore_rng(states: Optional[List[Dict[str, Any]]], dist: Dist) -> None:
    """Put back this rank's generators from a checkpoint's ``rng`` (when it has them; those of
    another number of processes are left, with a warning)."""
    if not states:
        return
    if len(states) != dist.world:
        if dist.main:
            log.warning("--resume: the checkpoint holds the random generators of %d process(es), this run has %d:"
                        " the rest of the run draws other random numbers", len(states), dist.world)  # fmt: skip
        return
    set_rng_state(states[dist.rank])


@dataclass
class Resumed:
    """Where a run continues, read from its ``last.pt``.

    ``epoch`` (0-based) is the first epoch to run, of which ``batch`` batches are done
    (0: an epoch end); ``step`` counts the batches of the whole run; ``state`` is the whole
    checkpoint (its optimizer is that of phase ``state["phase"]``).
    """

    path: Path
    epoch: int
    batch: int
    step: int
    best: float
    state: Dict[str, Any]

    @property
    def rng(self) -> Optional[List[Dict[str, Any]]]:
        return self.state.get("rng")

    @property
    def progress(self) -> Optional[Dict[str, Any]]:
        return self.state.get("progress") if self.batch else None


def read_resume(last: Path, model: nn.Module, metric: str, shape: Mapping[str, int]) -> Resumed:
    """Read ``last`` and load its weights into ``model``. ``shape``: this run's
    ``{batch_size, world, samples, steps, accumulate}``; a mid-epoch position saved with
    another one is refused (the position in the epoch would not mean the same)."""
    state = read_checkpoint(last)
    bad = non_finite_tensors(state["model"])
    if bad:  # written before vitpcm checked what it saves
        raise VitpcmError(
            f"--resume: {last} holds non-finite weights ({bad[0]}{' and more' if len(bad) > 1 else ''}): the run"
            " had diverged when it was saved; start a new run (lower learning rate) or resume from a copy of an"
            " earlier checkpoint"
        )
    load_weights(model, state["model"], last)
    best = float(state.get(f"best_{metric}", -math.inf))
    position = dict(state.get("position") or {})
    if not position:  # checkpoints written before positions were stored: an epoch end
        position = {"epoch": int(state["epoch"]), "batch": 0}
    epoch = int(position["epoch"])
    batch = int(position.get("batch", 0))
    if batch:
        for key, name in SHAPE_NAMES.items():
            if key in position and int(position[key]) != shape[key]:
                raise VitpcmError(
                    f"--resume: {last} was saved in the middle of epoch {epoch + 1} with {name} {position[key]}"
                    f" (now {shape[key]}): the position in the epoch would not mean the same; resume with the"
                    " run's own settings"
                )
    step = int(position.get("step", epoch * shape["steps"] + batch))
    return Resumed(path=last, epoch=epoch, batch=batch, step=step, best=best, state=state)


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` with one line instead of a size-mismatch line per tensor."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        own = model.state_dict()
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
