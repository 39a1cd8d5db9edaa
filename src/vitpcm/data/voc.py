"""PASCAL VOC 2012 and folders in its layout (the built-in synthetic set uses it too).

::

    ROOT/JPEGImages/NAME.jpg
    ROOT/SegmentationClass/NAME.png          optional (tags and evaluation come from it)
    ROOT/ImageSets/Segmentation/SPLIT.txt    one NAME per line: train, val, trainval, test
    ROOT/classes.txt                         optional; default: the 21 VOC names

Split ``trainaug`` (also ``train_aug``) adds the SBD masks (``data.sbd``, see ``sbd.py``):
its names come from ``ImageSets/Segmentation/trainaug.txt`` when present, else from the
converted form's ``train_aug.txt``, else VOC train + SBD train + SBD val; VOC val is
always taken out (10,582 images on the real data). Each image's mask is VOC's own
``SegmentationClass/NAME.png`` when it exists (finer, with the 255 border), else SBD's.
Images come from ``JPEGImages/``, else from SBD's ``img/``.

Tags come from the masks (255 ignored); a split without masks (``test``) takes them from
a tag file (``data.tags``, CSV or JSON, see ``tags.py``) or has none.

Every dataset yields the same sample dict (see ``docs/architecture.md``)::

    {"image": uint8 tensor [3, H, W] (before a transform), "labels": float [C] multi-hot,
     "mask": int64 [H, W] with 255 = ignore (when known), "name": str, "size": (H, W)}

A ``transform`` callable turns it into what a stage needs (resized, normalised, views).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitpcm.classes import VOC_CLASSES, class_list, read_classes
from vitpcm.data.base import MISSING_IMAGE, MISSING_MASK, Sample, TaggedImageDataset
from vitpcm.data.sbd import AugSource, find_aug_source, read_sbd_mat
from vitpcm.data.tags import read_tag_file
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png, read_names

AUG_SPLITS = ("trainaug", "train_aug")


class VOCDataset(TaggedImageDataset):
    """A split of a VOC-layout folder.

    Args:
        root: the folder that holds ``JPEGImages/``.
        split: name of a list in ``ImageSets/Segmentation/`` (``train``, ``val``, ...), or
            ``trainaug``.
        classes: class names (background first) or a class-list file; default
            ``ROOT/classes.txt`` if present, else the 21 VOC names.
        transform: applied to each raw sample dict.
        require_masks: the split must have tags (from masks, or from ``tags``): training.
        sbd: where the SBD masks are (split ``trainaug`` only; see ``sbd.py``).
        tags: tag file for a split without masks.
        strict: raise on listing problems (missing files, duplicates); ``False`` keeps
            them in ``listing_problems`` for ``vitpcm check-data``.
    """

    format = "voc"

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Optional[Sequence[str] | str | Path] = None,
        transform: Optional[Callable[[Sample], Sample]] = None,
        require_masks: bool = True,
        sbd: Optional[str | Path] = None,
        tags: Optional[str | Path] = None,
        strict: bool = True,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise VitpcmError(f"dataset folder {root} not found: set data.root to the folder that holds JPEGImages/")
        if not (root / "JPEGImages").is_dir():
            hint = ""
            if (root / "VOC2012" / "JPEGImages").is_dir():
                hint = f" (did you mean {root / 'VOC2012'}?)"
            raise VitpcmError(f"{root} has no JPEGImages/ folder{hint}: data.root must be the folder that holds it")
        super().__init__(root, split, resolve_classes(root, classes), transform)
        self.image_dir = root / "JPEGImages"
        self.mask_dir = root / "SegmentationClass"
        self._aug: Optional[AugSource] = find_aug_source(root, sbd) if split in AUG_SPLITS else None

        names, source = self._split_names(split)
        self.add_names(names, source)
        self._masks: Dict[str, Optional[Path]] = {n: self._find_mask(n) for n in self.names}
        for n in self.names:
            if not self.image_path(n).is_file():
                self.add_problem(n, MISSING_IMAGE, self.image_path(n),
                                 f"image listed in {source.name} is missing: restore it or remove '{n}'"
                                 " from the list")  # fmt: skip
        with_mask = sum(p is not None for p in self._masks.values())
        self.has_masks = with_mask > 0
        if 0 < with_mask < len(self.names):
            # Some masks but not all: a split with masks needs every one (VOC: tags come from them).
            for n, p in self._masks.items():
                if p is None:
                    self.add_problem(n, MISSING_MASK, self.mask_dir / f"{n}.png",
                                     "mask missing (its split has masks, and tags come from them): restore it or"
                                     f" remove '{n}' from {source.name}")  # fmt: skip

        self._tags: Dict[str, np.ndarray] = {}
        if self.has_masks and tags:
            self.info.append(f"tags come from the masks; data.tags ({tags}) is used only for splits without masks")
        if not self.has_masks and tags:
            table = read_tag_file(tags)
            for n in self.names:
                vec, why = table.lookup(n, self.classes)
                if vec is None:
                    self.add_problem(n, why[0], table.path, why[1])
                else:
                    self._tags[n] = vec
        elif not self.has_masks and require_masks:
            raise VitpcmError(
                f"split '{split}' has no masks in {self.mask_dir} and no tag file: training needs image tags;"
                " give data.tags=FILE (CSV or JSON) or use a split with masks"
            )
        if strict:
            self.raise_listing_problems()

    def _split_names(self, split: str) -> Tuple[List[str], Path]:
        seg = self.root / "ImageSets" / "Segmentation"
        list_file = seg / f"{split}.txt"
        if list_file.is_file():
            names, source = read_names(list_file), list_file
        elif self._aug is not None:
            names, source = self._derive_trainaug(seg)
        else:
            available = sorted(p.stem for p in seg.glob("*.txt")) if seg.is_dir() else []
            raise VitpcmError(
                f"split '{split}' not found: {list_file} is missing (available splits: {available or 'none'};"
                " trainaug is built from the SBD masks)"
            )
        if not names:
            raise VitpcmError(f"split '{split}' is empty: {source} lists no images")
        if self._aug is not None and (seg / "val.txt").is_file():
            # trainaug = VOC train + SBD minus VOC val: val images must never be trained on.
            val = set(read_names(seg / "val.txt"))
            kept = [n for n in names if n not in val]
            if len(kept) < len(names):
                self.info.append(f"{len(names) - len(kept)} names from {source} are in VOC val:"
                                 " left out (val is never trained on)")  # fmt: skip
            names = kept
        return names, source

    def _derive_trainaug(self, seg: Path) -> Tuple[List[str], Path]:
        aug = self._aug
        assert aug is not None
        if aug.list_file is not None:
            return read_names(aug.list_file), aug.list_file
        train = read_names(seg / "train.txt") if (seg / "train.txt").is_file() else []
        names = sorted(set(train) | set(aug.names))
        self.info.append(
            f"trainaug = VOC train ({len(train)}) + {aug.describe()} ({len(aug.names)}) - VOC val, without repeats"
        )
        return names, aug.mask_dir

    def _find_mask(self, name: str) -> Optional[Path]:
        own = self.mask_dir / f"{name}.png"
        if own.is_file():
            return own
        if self._aug is not None and self._aug.mask_path(name).is_file():
            return self._aug.mask_path(name)
        return None

    def image_path(self, name: str) -> Path:
        path = self.image_dir / f"{name}.jpg"
        if not path.is_file() and self._aug is not None and self._aug.image_dir is not None:
            fallback = self._aug.image_dir / f"{name}.jpg"
            if fallback.is_file():
                return fallback
        return path

    def mask_path(self, name: str) -> Optional[Path]:
        return self._masks.get(name)

    def read_mask(self, name: str, size: Tuple[int, int]) -> np.ndarray:
        path = self._masks.get(name)
        if path is None:
            raise VitpcmError(f"no mask for '{name}'")
        if path.suffix == ".mat":
            return read_sbd_mat(path)
        return read_mask_png(path)

    def file_tags(self, name: str) -> Optional[np.ndarray]:
        return self._tags.get(name)


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
