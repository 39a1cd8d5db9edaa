"""What every dataset format shares: the sample dict, per-item inspection, problems.

A format (VOC, COCO, own folder) only says where things are: the names of a split, the
image file of a name, how to read its mask, where its tags come from. This base class
does the reading, and the same code path answers both training (:meth:`raw`, which raises
on a broken item) and ``vitpcm check-data`` (:meth:`inspect`, which reports it), so what
passes the check is exactly what training can load.

Problems are found at two moments:

* listing (in ``__init__``, no file decoded): missing image or mask, duplicate names,
  tag-file rows without a class, unknown class names. Kept in ``listing_problems``;
  with ``strict=True`` (the default for the API) the constructor raises on them.
* reading (:meth:`inspect`): unreadable or truncated image, unreadable mask, mask size
  different from the image as displayed, mask values outside the class list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vitpcm.classes import IGNORE_INDEX
from vitpcm.errors import VitpcmError
from vitpcm.images import ImageReadError, decode_image
from vitpcm.io import format_names, labels_from_mask

Sample = Dict[str, Any]

# Problem kinds (stable strings: tests, skipped.txt and the JSON report use them).
MISSING_IMAGE = "missing-image"
MISSING_MASK = "missing-mask"
UNREADABLE_IMAGE = "unreadable-image"
TRUNCATED_IMAGE = "truncated-image"
UNREADABLE_MASK = "unreadable-mask"
SIZE_MISMATCH = "size-mismatch"
BAD_MASK_VALUE = "bad-mask-value"
NO_TAGS = "no-tags"
UNKNOWN_CLASS = "unknown-class"
DUPLICATE_NAME = "duplicate-name"


@dataclass(frozen=True)
class Problem:
    """One reason an item cannot be used: ``path`` is the file to look at, ``message``
    says what is wrong and what to do."""

    name: str
    kind: str
    path: str
    message: str

    def line(self, split: str) -> str:
        return f"[{split}] {self.path}: {self.message}"


@dataclass
class ItemReport:
    """What reading one item found. ``size`` is (H, W) as displayed; ``tags`` the
    foreground class indices (None when the split has no tags)."""

    name: str
    size: Optional[Tuple[int, int]] = None
    tags: Optional[Tuple[int, ...]] = None
    background_only: bool = False  # a mask with no foreground pixel (kept: not a problem)
    problems: List[Problem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # silent conversions: "greyscale", "16-bit", ...
    warnings: List[str] = field(default_factory=list)  # odd but usable


def tag_vector(indices: Iterable[int], num_classes: int) -> np.ndarray:
    """Multi-hot ``[num_classes]`` float32 with background (index 0) always on."""
    tags = np.zeros(num_classes, dtype=np.float32)
    tags[0] = 1.0
    for i in indices:
        tags[int(i)] = 1.0
    return tags


class TaggedImageDataset(Dataset):
    """Images with their class tags (and masks where the split has them): the dataset ViT-PCM
    trains on, and the base of every format. Subclasses fill ``names``, ``classes``, ``has_masks`` and
    ``listing_problems`` in ``__init__`` and implement :meth:`image_path`, and
    :meth:`read_mask` / :meth:`mask_path` when they have masks, :meth:`file_tags` when
    tags come from somewhere other than the mask.

    Attributes: ``root`` (Path), ``split`` (str), ``classes`` (names, background first),
    ``num_classes``, ``names`` (unique, in split order), ``has_masks``, ``transform``,
    ``info`` (split-level notes for the check report).
    """

    format = "base"

    def __init__(
        self, root: Path, split: str, classes: Sequence[str], transform: Optional[Callable[[Sample], Sample]]
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.classes: List[str] = list(classes)
        self.transform = transform
        self.names: List[str] = []
        self.has_masks = False
        self.listing_problems: Dict[str, List[Problem]] = {}
        self.info: List[str] = []
        self.jpeg_decoder = "pillow"  # data.jpeg_decoder (build_dataset sets it; vitpcm.images)

    # ---------------------------------------------------------------- format hooks
    def image_path(self, name: str) -> Path:
        raise NotImplementedError

    def mask_path(self, name: str) -> Optional[Path]:
        """The file a mask is read from (for messages); None when there is none."""
        return None

    def read_mask(self, name: str, size: Tuple[int, int]) -> np.ndarray:
        """``[H, W]`` uint8 class indices (255 = ignore). ``size`` is the image's (H, W),
        for formats that draw masks. Raises :class:`VitpcmError` when unreadable."""
        raise NotImplementedError

    def file_tags(self, name: str) -> Optional[np.ndarray]:
        """Tags known without the mask (tag file, annotations): multi-hot ``[C]``, or None."""
        return None

    def expected_size(self, name: str) -> Optional[Tuple[int, int]]:
        """(H, W) the annotations claim for the image, when they say (COCO)."""
        return None

    # ---------------------------------------------------------------- shared machinery
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.names)

    def add_problem(self, name: str, kind: str, path: Path | str, message: str) -> None:
        self.listing_problems.setdefault(name, []).append(Problem(name, kind, str(path), message))

    def add_names(self, names: Sequence[str], source: Path | str) -> None:
        """Set ``names`` from a listing, flagging names listed more than once."""
        seen: Dict[str, int] = {}
        for n in names:
            seen[n] = seen.get(n, 0) + 1
        self.names = list(seen)
        for n, count in seen.items():
            if count > 1:
                self.add_problem(n, DUPLICATE_NAME, source,
                                 f"'{n}' is listed {count} times: keep one line per image")  # fmt: skip

    def raise_listing_problems(self) -> None:
        """The constructor's ``strict=True``: one line naming the first problem and the count."""
        problems = [p for ps in self.listing_problems.values() for p in ps]
        if not problems:
            return
        kinds = sorted({p.kind for p in problems})
        names = [p.name for p in problems]
        first = problems[0]
        raise VitpcmError(
            f"split '{self.split}' has {len(problems)} problem(s) ({', '.join(kinds)}) in {format_names(names)},"
            f" e.g. {first.path}: {first.message} (`vitpcm check-data` lists them all)"
        )

    def drop(self, names: Iterable[str]) -> None:
        """Remove items by name (``--skip-bad``)."""
        gone = set(names)
        self.names = [n for n in self.names if n not in gone]

    def inspect(self, index: int) -> Tuple[Optional[Sample], ItemReport]:
        """Read one item as training would. Returns the raw sample (None when broken) and
        the report of what was found."""
        name = self.names[index]
        report = ItemReport(name)
        if name in self.listing_problems:
            report.problems.extend(self.listing_problems[name])
            return None, report
        ipath = self.image_path(name)
        try:
            image, report.notes = decode_image(ipath, self.jpeg_decoder)
        except ImageReadError as exc:
            if exc.truncated:
                kind, msg = TRUNCATED_IMAGE, f"the image is truncated ({exc}): download or export it again"
            else:
                kind, msg = UNREADABLE_IMAGE, f"the image cannot be decoded ({exc}): replace it with a readable file"
            report.problems.append(Problem(name, kind, str(ipath), msg))
            return None, report
        h, w = image.shape[:2]
        report.size = (h, w)
        expected = self.expected_size(name)
        if expected is not None and tuple(expected) != (h, w):
            report.problems.append(Problem(name, SIZE_MISMATCH, str(ipath),
                f"the image is {w}x{h} but its annotations are for {expected[1]}x{expected[0]}:"
                " the file does not belong to these annotations; restore the original"))  # fmt: skip

        mask = None
        if self.has_masks and not report.problems:
            mask = self._inspect_mask(name, (h, w), report)

        tags = self.file_tags(name)
        if tags is None and mask is not None and not report.problems:
            tags = labels_from_mask(mask, self.num_classes)
        if tags is not None:
            report.tags = tuple(int(i) for i in np.nonzero(tags[1:])[0] + 1)
        if mask is not None and tags is not None:
            in_mask = set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}
            extra = sorted(in_mask - set(report.tags or ()))
            if extra:
                report.warnings.append(
                    f"mask shows classes {[self.classes[i] for i in extra]} that are not in its tags"
                )
        if report.problems:
            return None, report

        sample: Sample = {"name": name, "size": (h, w)}
        if tags is not None:
            sample["labels"] = torch.from_numpy(tags)
        if mask is not None:
            sample["mask"] = torch.from_numpy(mask.astype(np.int64))
        sample["image"] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return sample, report

    def _inspect_mask(self, name: str, size: Tuple[int, int], report: ItemReport) -> Optional[np.ndarray]:
        h, w = size
        mpath = self.mask_path(name) or self.image_path(name)
        try:
            mask = self.read_mask(name, size)
        except VitpcmError as exc:
            report.problems.append(Problem(name, UNREADABLE_MASK, str(mpath), f"{exc}: replace the mask"))
            return None
        if mask.shape != (h, w):
            mh, mw = mask.shape[:2]
            hint = ""
            if "EXIF orientation" in report.notes and (mh, mw) == (w, h):
                hint = " (it matches the image before its EXIF rotation; masks must follow the image as displayed)"
            report.problems.append(Problem(name, SIZE_MISMATCH, str(mpath),
                f"the mask is {mw}x{mh} but its image is {w}x{h} as displayed{hint}: redraw or resize the mask"))  # fmt: skip
            return None
        values = np.unique(mask)
        bad = [int(v) for v in values if v >= self.num_classes and v != IGNORE_INDEX]
        if bad:
            report.problems.append(Problem(name, BAD_MASK_VALUE, str(mpath),
                f"mask values {bad} lie outside the {self.num_classes} classes (0..{self.num_classes - 1},"
                f" 255 = ignore): fix the mask or give the right class list (data.classes)"))  # fmt: skip
            return None
        report.background_only = bool(values[0] == 0) and not bool(np.any((values > 0) & (values != IGNORE_INDEX)))
        return mask

    def raw(self, index: int) -> Sample:
        """The untransformed sample dict (module docstring of ``voc.py``); raises
        :class:`VitpcmError` naming the file when the item is broken."""
        sample, report = self.inspect(index)
        if sample is None:
            p = report.problems[0]
            raise VitpcmError(f"{p.path}: {p.message}")
        return sample

    def __getitem__(self, index: int) -> Sample:
        sample = self.raw(index)
        return self.transform(sample) if self.transform is not None else sample


#: The older name (from before "segment" came to mean the DeepLab stage); kept as an alias.
SegmentationDataset = TaggedImageDataset
