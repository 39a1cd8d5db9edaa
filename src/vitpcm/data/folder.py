"""Your own images with image-level tags: the smallest layout vitpcm trains on.

::

    ROOT/images/NAME.jpg            any of .jpg .jpeg .png .bmp .gif .tif .tiff .webp (sub-folders allowed:
                                    the name is then a/b/NAME)
    ROOT/tags.csv                   NAME.jpg,cat;person  (or tags.json; see tags.py) or data.tags=FILE
    ROOT/masks/NAME.png             optional, for evaluation: class indices, 255 = ignore
    ROOT/classes.txt                optional: one class per line, background first
    ROOT/splits/SPLIT.txt           optional: one name per line

Split ``all`` is every image in ``images/`` and every row of the tag file (an image without
a row, or a row without an image, is a problem). Other splits come from ``splits/``.

Classes: ``data.classes``, else ``ROOT/classes.txt``, else inferred from the tag file:
background first, then every class named in it, sorted. An inferred list changes when you
add a class, so write ``classes.txt`` before training a model you want to keep.

Tags come from the tag file, never from masks. Masks are optional per image: an image
without one gets an all-255 mask, so it counts for nothing in the mIoU of ``vitpcm infer``
(``vitpcm evaluate --gt ROOT/masks`` evaluates the images that have one).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitpcm.classes import IGNORE_INDEX, class_list
from vitpcm.data.base import DUPLICATE_NAME, MISSING_IMAGE, Sample, TaggedImageDataset
from vitpcm.data.tags import BACKGROUND, TagTable, read_tag_file
from vitpcm.errors import VitpcmError
from vitpcm.io import IMAGE_EXTENSIONS, read_mask_png, read_names


class FolderDataset(TaggedImageDataset):
    """A split of an own tagged folder (module docstring).

    Args:
        root: the folder that holds ``images/``.
        split: ``all`` or the name of a list in ``ROOT/splits/``.
        classes: class names, a class-list file or a built-in name; default as above.
        tags: the tag file; default ``ROOT/tags.csv`` or ``ROOT/tags.json``.
        masks: the mask folder; default ``ROOT/masks``.
        strict: raise on listing problems (missing images, untagged images, duplicates).
    """

    format = "folder"

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        classes: Optional[Sequence[str] | str | Path] = None,
        transform: Optional[Callable[[Sample], Sample]] = None,
        tags: Optional[str | Path] = None,
        masks: Optional[str | Path] = None,
        strict: bool = True,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise VitpcmError(f"dataset folder {root} not found: set data.root to the folder that holds images/")
        image_dir = root / "images"
        if not image_dir.is_dir():
            raise VitpcmError(
                f"{root} has no images/ folder: data.root must be the folder that holds images/ and tags.csv"
            )
        table = read_tag_file(_find_tag_file(root, tags))
        super().__init__(root, split, _resolve_classes(root, classes, table), transform)
        if classes is None and not (root / "classes.txt").is_file():
            self.info.append(f"classes inferred from {table.path.name} (write classes.txt to fix them):"
                             f" {', '.join(self.classes[1:])}")  # fmt: skip
            for c in self.classes[1:]:
                close = difflib.get_close_matches(c, [o for o in self.classes[1:] if o != c], n=1, cutoff=0.6)
                if close:
                    self.info.append(f"class '{c}' looks like '{close[0]}': a typo in {table.path.name}?")
        self.image_dir = image_dir
        self.tag_file = table.path

        # name -> image files; two files with one name (a.jpg, a.png) are ambiguous
        files: Dict[str, List[Path]] = {}
        for p in sorted(image_dir.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."):
                files.setdefault(p.relative_to(image_dir).with_suffix("").as_posix(), []).append(p)
        self._files = {n: ps[0] for n, ps in files.items()}

        if split == "all":
            names, source = sorted(set(files) | set(table.rows)), table.path
        else:
            list_file = root / "splits" / f"{split}.txt"
            if not list_file.is_file():
                available = ["all"] + sorted(p.stem for p in (root / "splits").glob("*.txt"))
                raise VitpcmError(
                    f"split '{split}' not found: {list_file} is missing (available splits: {available});"
                    " split 'all' uses every image"
                )
            names, source = read_names(list_file), list_file
        if not names:
            raise VitpcmError(f"split '{split}' is empty: {source} lists no images")
        self.add_names(names, source)

        self._tags: Dict[str, np.ndarray] = {}
        for n in self.names:
            if len(files.get(n, ())) > 1:
                same = ", ".join(p.name for p in files[n])
                self.add_problem(n, DUPLICATE_NAME, files[n][0],
                                 f"several images are named '{n}' ({same}): rename or remove all but one")  # fmt: skip
            if n not in self._files:
                self.add_problem(n, MISSING_IMAGE, image_dir / n,
                                 f"'{n}' is in {source.name} but no image {n}.* is in {image_dir}:"
                                 " add it or remove the entry")  # fmt: skip
            vec, why = table.lookup(n, self.classes)
            if vec is None:
                self.add_problem(n, why[0], table.path, why[1])
            else:
                self._tags[n] = vec

        self.mask_dir = Path(masks) if masks else root / "masks"
        with_mask = [n for n in self.names if (self.mask_dir / f"{n}.png").is_file()] if self.mask_dir.is_dir() else []
        self.has_masks = bool(with_mask)
        if self.has_masks and len(with_mask) < len(self.names):
            self.info.append(
                f"{len(self.names) - len(with_mask)} of {len(self.names)} images have no mask in {self.mask_dir}:"
                " they count for nothing in the mIoU"
            )
        self._with_mask = set(with_mask)
        if strict:
            self.raise_listing_problems()

    def image_path(self, name: str) -> Path:
        return self._files.get(name, self.image_dir / name)

    def mask_path(self, name: str) -> Optional[Path]:
        return self.mask_dir / f"{name}.png" if name in self._with_mask else None

    def read_mask(self, name: str, size: Tuple[int, int]) -> np.ndarray:
        if name not in self._with_mask:
            return np.full(size, IGNORE_INDEX, dtype=np.uint8)  # no ground truth: ignored everywhere
        return read_mask_png(self.mask_dir / f"{name}.png")

    def file_tags(self, name: str) -> Optional[np.ndarray]:
        return self._tags.get(name)


def _find_tag_file(root: Path, tags: Optional[str | Path]) -> Path:
    if tags:
        return Path(tags)
    found = [root / n for n in ("tags.csv", "tags.json") if (root / n).is_file()]
    if len(found) > 1:
        raise VitpcmError(f"{root} holds both tags.csv and tags.json: remove one, or choose with data.tags=FILE")
    if not found:
        raise VitpcmError(
            f"{root} has no tags.csv or tags.json: write one (name,class;class per line) or set data.tags=FILE"
        )
    return found[0]


def _resolve_classes(root: Path, classes: Optional[Sequence[str] | str | Path], table: TagTable) -> List[str]:
    if classes is not None and not isinstance(classes, (str, Path)):
        names = list(classes)
    elif classes is not None:
        names = class_list(classes)
    elif (root / "classes.txt").is_file():
        names = class_list(root / "classes.txt")
    else:
        names = [BACKGROUND] + table.class_names()
    if len(names) < 2:
        raise VitpcmError(f"{table.path} names no class: tag each image with the classes it shows")
    if len(names) > 255:
        raise VitpcmError(f"{len(names)} classes; masks hold at most 255 (255 = ignore): check {table.path}")
    return names
