"""Checkpoints: atomic save (never of non-finite weights), validated read, finding a run's.

The model class is never named here: the engine saves what its task gives it, and
:func:`vitpcm.stages.load.load_model` rebuilds a model from the stored ``arch`` through
the registry (:func:`vitpcm.models.registry.create_model`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from vitpcm.atomic import atomic_fd, disk_error
from vitpcm.errors import VitpcmError
from vitpcm.runs import RunLayout

FORMAT_VERSION = 1


class NonFiniteState(VitpcmError):
    """A state to save holds NaN or infinite tensors (the run diverged)."""


def _tensors(obj: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def non_finite_tensors(obj: Any) -> List[str]:
    """Dotted names of the floating-point tensors in ``obj`` (nested dicts/lists) that hold
    a NaN or an infinity; ``[]`` when every tensor is finite."""
    bad = []
    for name, t in _tensors(obj):
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def save_checkpoint(path: str | Path, state: Dict[str, Any], check_finite: bool = True) -> None:
    """``torch.save`` into an unnamed file renamed onto ``path`` once complete
    (:func:`vitpcm.atomic.atomic_fd`): a kill never leaves a truncated checkpoint, nor a temporary.

    With ``check_finite`` (default) a state holding a NaN or infinite tensor is refused
    with :class:`NonFiniteState` before anything is written: a diverged run never replaces
    its last good checkpoint. The bytes reach the disk (fsync) before the rename. A full
    disk, a read-only folder or a file-size limit raise one-line
    :class:`vitpcm.atomic.DiskError` naming the folder; the previous file stays as it was.
    """
    if check_finite:
        bad = non_finite_tensors({"model": state.get("model"), "optimizer": state.get("optimizer")})
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise NonFiniteState(f"non-finite values in {shown}: {path} not written")
    state = dict(state, format_version=FORMAT_VERSION)
    with atomic_fd(path) as fd:  # unnamed until complete: a kill mid-save leaves no temporary
        sink = _Sink(fd)
        try:
            torch.save(state, sink)
            os.fsync(fd)
        except Exception as exc:
            # torch reports a failed write as "enforce fail at inline_container.cc": the
            # sink kept the system's error (ENOSPC, EROFS, EFBIG, ...), which says what happened
            cause = sink.error or (exc if isinstance(exc, OSError) else None)
            err = disk_error(cause, path) if cause is not None else None
            if err is None:
                raise
            raise err from None


class _Sink:
    """A file-like object for ``torch.save`` that writes every byte (short writes retried)
    and remembers the ``OSError`` of a failed write."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as exc:
            self.error = exc
            raise
        return done

    def flush(self) -> None:
        pass


def read_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Load a vitpcm checkpoint dict on the CPU, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors come in many types
        raise VitpcmError(
            f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise VitpcmError(f"{path} is not a vitpcm checkpoint (no 'arch'/'model' entries)")
    return state


def checkpoint_config(path: str | Path) -> Optional[Dict[str, Any]]:
    """The config dict stored in a checkpoint (``state["config"]``), or None. Reads the file
    memory-mapped, so a large checkpoint costs no copy of its tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one), or unreadable
        state = read_checkpoint(path)
    config = state.get("config") if isinstance(state, dict) else None
    return dict(config) if isinstance(config, dict) else None


def find_run_checkpoint(run: str | Path, which: str = "best") -> Path:
    """``RUN/checkpoints/{best,last}.pt``; falls back to ``last`` when ``best`` is absent."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise VitpcmError(f"run folder {run} not found: give the --out folder of `vitpcm train` or a .pt file")
    layout = RunLayout(run)
    for name in (which, "last"):
        path = layout.checkpoint(name)
        if path.is_file():
            return path
    shown = f"{layout.checkpoint(which).relative_to(run)} or {layout.checkpoint('last').relative_to(run)}"
    raise VitpcmError(f"{run} holds no {shown}: has `vitpcm train` finished an epoch there?")


def init_from(model: nn.Module, path: str | Path) -> None:
    """Initialise ``model`` from another vitpcm checkpoint (same architecture and classes)."""
    state = read_checkpoint(path)
    bad = non_finite_tensors(state["model"])
    if bad:
        raise VitpcmError(
            f"model.init_from: {path} holds non-finite weights ({bad[0]}{' and more' if len(bad) > 1 else ''}):"
            " its run had diverged; start from another checkpoint"
        )
    theirs = int(state["arch"].get("num_classes", -1))
    if theirs != getattr(model, "num_classes", theirs):
        raise VitpcmError(
            f"checkpoint {path} has {theirs} classes but this model has {model.num_classes}:"
            " model.init_from needs a checkpoint trained on the same class list"
        )
    try:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:  # size mismatches
        raise VitpcmError(
            f"checkpoint {path} does not fit model {_describe(model)}: {str(exc).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise VitpcmError(
            f"checkpoint {path} does not fit model {_describe(model)}"
            f" ({len(missing)} missing, {len(unexpected)} unexpected tensors): check model.* settings"
        )


def _describe(model: nn.Module) -> str:
    """The backbone name for messages (ViT-PCM), else the class name."""
    return str(getattr(model, "arch", {}).get("backbone") or type(model).__name__)
