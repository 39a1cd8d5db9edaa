"""Datasets and transforms. Every dataset yields the same sample dict (see ``voc.py``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from vitpcm.data.transforms import EvalTransform, TrainTransform, collate
from vitpcm.data.voc import VOCDataset
from vitpcm.errors import VitpcmError

__all__ = ["VOCDataset", "TrainTransform", "EvalTransform", "collate", "build_dataset"]


def build_dataset(
    data_cfg: Any, split: str, transform: Optional[Callable] = None, require_masks: bool = True
) -> VOCDataset:
    """The dataset selected by the ``data`` config section for one split."""
    if not data_cfg.root:
        raise VitpcmError("no dataset given: set data.root=PATH (the folder that holds JPEGImages/)")
    return VOCDataset(data_cfg.root, split, classes=data_cfg.classes, transform=transform, require_masks=require_masks)
