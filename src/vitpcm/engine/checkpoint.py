"""Checkpoints: atomic save, validated load, model rebuild."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from vitpcm.errors import VitpcmError
from vitpcm.io import atomic_path
from vitpcm.models.vitpcm import ViTPCM

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: Dict[str, Any]) -> None:
    """``torch.save`` through a temporary file, so a kill never leaves a truncated checkpoint."""
    state = dict(state, format_version=FORMAT_VERSION)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Load a vitpcm checkpoint dict on the CPU, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors come in many types
        raise VitpcmError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise VitpcmError(f"{path} is not a vitpcm checkpoint (no 'arch'/'model' entries)")
    return state


def find_run_checkpoint(run: str | Path, which: str = "best") -> Path:
    """``RUN/checkpoints/{best,last}.pt``; falls back to ``last`` when ``best`` is absent."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise VitpcmError(f"run folder {run} not found: give the --out folder of `vitpcm train` or a .pt file")
    for name in (which, "last"):
        path = run / "checkpoints" / f"{name}.pt"
        if path.is_file():
            return path
    raise VitpcmError(f"{run} holds no checkpoints/{which}.pt or checkpoints/last.pt: has `vitpcm train` finished an epoch there?")


def load_model(
    path: str | Path, expected_classes: Optional[Sequence[str]] = None
) -> Tuple[ViTPCM, Dict[str, Any]]:
    """Rebuild the model stored in a checkpoint and load its weights.

    ``expected_classes``, when given, must match the checkpoint's class count.
    """
    state = read_checkpoint(path)
    arch = dict(state["arch"])
    if expected_classes is not None and int(arch["num_classes"]) != len(expected_classes):
        raise VitpcmError(
            f"checkpoint {path} was trained for {arch['num_classes']} classes but the data has"
            f" {len(expected_classes)}: use the class list the model was trained with (data.classes)"
        )
    model = ViTPCM.from_arch(arch)
    model.load_state_dict(state["model"])
    return model, state


def init_from(model: ViTPCM, path: str | Path) -> None:
    """Initialise ``model`` from another vitpcm checkpoint (same architecture and classes)."""
    state = read_checkpoint(path)
    theirs = int(state["arch"]["num_classes"])
    if theirs != model.num_classes:
        raise VitpcmError(
            f"checkpoint {path} has {theirs} classes but this model has {model.num_classes}:"
            " model.init_from needs a checkpoint trained on the same class list"
        )
    try:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:  # size mismatches
        raise VitpcmError(f"checkpoint {path} does not fit model {model.arch['backbone']}: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise VitpcmError(
            f"checkpoint {path} does not fit model {model.arch['backbone']}"
            f" ({len(missing)} missing, {len(unexpected)} unexpected tensors): check model.* settings"
        )
