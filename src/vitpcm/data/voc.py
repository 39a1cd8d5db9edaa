"""Datasets in the PASCAL VOC layout (the built-in synthetic set uses it too).

::

    ROOT/JPEGImages/NAME.jpg
    ROOT/SegmentationClass/NAME.png          optional (needed for tags and for evaluation)
    ROOT/ImageSets/Segmentation/SPLIT.txt    one NAME per line
    ROOT/classes.txt                         optional; default: the 21 VOC names

Every dataset yields the same sample dict (see ``docs/architecture.md``)::

    {"image": uint8 tensor [3, H, W] (before a transform), "labels": float [C] multi-hot,
     "mask": int64 [H, W] with 255 = ignore (when known), "name": str, "size": (H, W)}

A ``transform`` callable turns it into what a stage needs (resized, normalised, views).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from vitpcm.errors import VitpcmError
from vitpcm.io import VOC_CLASSES, class_list, format_names, labels_from_mask, read_classes, read_mask_png, read_names

Sample = Dict[str, Any]


def load_rgb(path: Path) -> np.ndarray:
    """Read an image as ``[H, W, 3]`` uint8 RGB as displayed (EXIF orientation applied)."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img).astype(np.float64)
                arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
                img = Image.fromarray(arr)
            return np.array(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise VitpcmError(f"cannot read image {path}: {exc}") from None


class VOCDataset(Dataset):
    """A split of a VOC-layout folder.

    Args:
        root: the folder that holds ``JPEGImages/``.
        split: name of a list in ``ImageSets/Segmentation/`` (``train``, ``val``, ...).
        classes: class names (background first) or a class-list file; default
            ``ROOT/classes.txt`` if present, else the 21 VOC names.
        transform: applied to each raw sample dict.
        require_masks: raise if a listed image has no mask (tags come from masks).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Optional[Sequence[str] | str | Path] = None,
        transform: Optional[Callable[[Sample], Sample]] = None,
        require_masks: bool = True,
    ) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise VitpcmError(f"dataset folder {self.root} not found: set data.root to the folder that holds JPEGImages/")
        if not (self.root / "JPEGImages").is_dir():
            hint = ""
            if (self.root / "VOC2012" / "JPEGImages").is_dir():
                hint = f" (did you mean {self.root / 'VOC2012'}?)"
            raise VitpcmError(f"{self.root} has no JPEGImages/ folder{hint}: data.root must be the folder that holds it")
        self.classes = resolve_classes(self.root, classes)
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            available = sorted(p.stem for p in (self.root / "ImageSets" / "Segmentation").glob("*.txt"))
            raise VitpcmError(f"split '{split}' not found: {list_file} is missing (available splits: {available or 'none'})")
        self.names: List[str] = read_names(list_file)
        if not self.names:
            raise VitpcmError(f"split '{split}' is empty: {list_file} lists no images")
        self.transform = transform
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self.root / "SegmentationClass"
        missing = [n for n in self.names if not self._image_path(n).is_file()]
        if missing:
            raise VitpcmError(
                f"{len(missing)} image(s) of split '{split}' missing from {self.image_dir}: {format_names(missing)}"
            )
        self.has_masks = all((self.mask_dir / f"{n}.png").is_file() for n in self.names)
        if require_masks and not self.has_masks:
            lacking = [n for n in self.names if not (self.mask_dir / f"{n}.png").is_file()]
            raise VitpcmError(
                f"{len(lacking)} image(s) of split '{split}' have no mask in {self.mask_dir} ({format_names(lacking)}):"
                " image tags are read from the masks"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _image_path(self, name: str) -> Path:
        return self.image_dir / f"{name}.jpg"

    def __len__(self) -> int:
        return len(self.names)

    def raw(self, index: int) -> Sample:
        """The untransformed sample: image as uint8 tensor ``[3, H, W]``."""
        name = self.names[index]
        image = load_rgb(self._image_path(name))
        h, w = image.shape[:2]
        sample: Sample = {"name": name, "size": (h, w)}
        mask_path = self.mask_dir / f"{name}.png"
        if mask_path.is_file():
            mask = read_mask_png(mask_path)
            if mask.shape != (h, w):
                raise VitpcmError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}")
            try:
                sample["labels"] = torch.from_numpy(labels_from_mask(mask, self.num_classes))
            except ValueError as exc:
                raise VitpcmError(f"mask {mask_path}: {exc}; check data.classes") from None
            sample["mask"] = torch.from_numpy(mask.astype(np.int64))
        sample["image"] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return sample

    def __getitem__(self, index: int) -> Sample:
        sample = self.raw(index)
        return self.transform(sample) if self.transform is not None else sample


def resolve_classes(root: Path, classes: Optional[Sequence[str] | str | Path]) -> List[str]:
    """Class names from a list, a file, a built-in name (``voc12``, ``coco14``),
    ``ROOT/classes.txt``, or the VOC default."""
    if classes is None:
        default = root / "classes.txt"
        return read_classes(default) if default.is_file() else list(VOC_CLASSES)
    if isinstance(classes, (str, Path)):
        return class_list(classes)
    names = list(classes)
    if len(names) < 2:
        raise VitpcmError("the class list needs background plus at least one class")
    return names
