"""Datasets and transforms. Every dataset yields the same sample dict (see ``base.py``).

Formats (``data.format``): ``voc`` (VOC 2012 layout incl. SBD trainaug, and the synthetic
set), ``coco`` (COCO 2014 instances), ``folder`` (own images + tag file).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from vitpcm.data.base import SegmentationDataset, TaggedImageDataset
from vitpcm.data.coco import COCODataset
from vitpcm.data.folder import FolderDataset
from vitpcm.data.transforms import EvalTransform, TrainTransform, collate
from vitpcm.data.voc import VOCDataset
from vitpcm.errors import VitpcmError

__all__ = [
    "VOCDataset",
    "COCODataset",
    "FolderDataset",
    "TaggedImageDataset",
    "SegmentationDataset",
    "TrainTransform",
    "EvalTransform",
    "collate",
    "build_dataset",
    "FORMATS",
]

FORMATS = ("voc", "coco", "folder")
_ROOT_HINT = {"voc": "the folder that holds JPEGImages/", "coco": "the folder that holds annotations/ and train2014/",
              "folder": "the folder that holds images/ and tags.csv"}  # fmt: skip


def build_dataset(
    data_cfg: Any,
    split: str,
    transform: Optional[Callable] = None,
    require_masks: bool = True,
    strict: bool = True,
) -> TaggedImageDataset:
    """The dataset selected by the ``data`` config section for one split.

    ``require_masks``: the split must carry tags (training); for VOC they come from the
    masks or ``data.tags``, for COCO and folder they always exist. ``strict=False`` keeps
    listing problems (missing files, duplicates) for the check instead of raising.
    """
    fmt = str(data_cfg.get("format", "voc") or "voc")
    if fmt not in FORMATS:
        raise VitpcmError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not data_cfg.root:
        raise VitpcmError(f"no dataset given: set data.root=PATH ({_ROOT_HINT[fmt]})")
    if fmt == "coco":
        dataset = COCODataset(data_cfg.root, split, classes=data_cfg.classes, transform=transform,
                           masks=data_cfg.get("masks"), strict=strict, gt=str(data_cfg.get("coco_gt", "vitpcm")))  # fmt: skip
    elif fmt == "folder":
        dataset = FolderDataset(data_cfg.root, split, classes=data_cfg.classes, transform=transform,
                             tags=data_cfg.get("tags"), masks=data_cfg.get("masks"), strict=strict)  # fmt: skip
    else:
        dataset = VOCDataset(data_cfg.root, split, classes=data_cfg.classes, transform=transform,
                             require_masks=require_masks, sbd=data_cfg.get("sbd"), tags=data_cfg.get("tags"), strict=strict)  # fmt: skip
    dataset.jpeg_decoder = str(data_cfg.get("jpeg_decoder", "pillow") or "pillow")  # fidelity switch 12
    return dataset
