"""Load what a run trained: the model of a checkpoint, rebuilt through the model registry.

``vitpcm.load_run(RUN)`` is the public door: a trained run and an imported one alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch.nn as nn

from vitpcm.engine.checkpoint import find_run_checkpoint, non_finite_tensors, read_checkpoint
from vitpcm.errors import VitpcmError
from vitpcm.models.registry import create_model
from vitpcm.runs import run_of_checkpoint


def load_model(path: str | Path, expected_classes: Optional[Sequence[str]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (any registered model, by ``arch["name"]``)
    and load its weights. Returns ``(model, checkpoint dict)``.

    ``expected_classes``, when given, must match the checkpoint's class count.
    """
    state = read_checkpoint(path)
    arch = dict(state["arch"])
    if expected_classes is not None and "num_classes" in arch and int(arch["num_classes"]) != len(expected_classes):
        raise VitpcmError(
            f"checkpoint {path} was trained for {arch['num_classes']} classes but the data has"
            f" {len(expected_classes)}: use the class list the model was trained with (data.classes)"
        )
    bad = non_finite_tensors(state["model"])
    if bad:  # a diverged model would write masks from NaN weights without a word
        raise VitpcmError(
            f"checkpoint {path} holds non-finite weights ({bad[0]}{' and more' if len(bad) > 1 else ''}):"
            " the run diverged; use an earlier checkpoint or retrain with a lower learning rate"
        )
    model = create_model(arch)
    model.load_state_dict(state["model"])
    return model, state


def load_run(run: str | Path, which: str = "best") -> Tuple[nn.Module, Dict[str, Any]]:
    """The model of a run folder (or a checkpoint file), in eval mode, and what is known of it.

    ``which``: ``best`` (falls back to ``last``) or ``last``. ``model(x)`` takes images
    normalised as the backbone expects (``info["normalisation"]``; ``(x - 0.5) / 0.5`` on
    [0, 1] for the authors' ViT). ``info``: ``checkpoint`` (path), ``run`` (folder or None),
    ``classes``, ``config`` (the stored dict), ``epoch``, ``arch``, ``normalisation``
    ``{"mean", "std"}`` when the model has one.
    """
    path = find_run_checkpoint(run, which)
    model, state = load_model(path)
    model.eval()
    layout = run_of_checkpoint(path)
    info: Dict[str, Any] = {
        "checkpoint": str(path),
        "run": str(layout.root) if layout else None,
        "classes": state.get("classes"),
        "config": state.get("config"),
        "epoch": state.get("epoch"),
        "arch": dict(state["arch"]),
    }
    # what training fed the model: the stored config's numbers (resolved at training time),
    # else the backbone's own pretrained statistics
    inp = (state.get("config") or {}).get("input", {})
    if isinstance(inp.get("mean"), list) and isinstance(inp.get("std"), list):
        info["normalisation"] = {"mean": [float(v) for v in inp["mean"]], "std": [float(v) for v in inp["std"]]}
    elif getattr(model, "normalisation", None) is not None:
        mean, std = model.normalisation
        info["normalisation"] = {"mean": list(mean), "std": list(std)}
    return model, info
