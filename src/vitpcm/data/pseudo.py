"""Images of a split with masks from any folder of PNGs: what the verification DeepLab trains on.

``vitpcm segment train CONFIG --pseudo DIR`` reads the images of ``data.train_split``
through the usual dataset (:func:`vitpcm.data.build_dataset`) and each image's mask from
``DIR/NAME.png`` (palette or greyscale class indices, 255 = ignore; what ``vitpcm infer``
writes to ``masks/`` and ``vitpcm crf`` to ``crf/``). The image list is the split's names
that have a mask; the others are counted and left out.

Before anything is written, :func:`check_pseudo_masks` reads every mask once and stops at
the first bad one, with one line naming the file and the fix: a mask whose size differs
from its image (as displayed), or values beyond the class list (other than 255).
:func:`list_pseudo_masks` refuses an empty folder and a folder of probabilities (``.npz``).

:class:`SegmentTrainTransform` is DeepLab's training augmentation (kazuto1011's
``_augmentation``): one random scale from a list, padding to the crop (image with the mean,
i.e. 0 after normalisation; mask with 255), a random crop, a random horizontal flip.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from vitpcm.classes import IGNORE_INDEX
from vitpcm.data.transforms import to_model_input
from vitpcm.errors import VitpcmError
from vitpcm.images import ImageReadError, decode_image
from vitpcm.io import format_names, names_in, read_mask_png
from vitpcm.utils.system import resolve_workers

Sample = Dict[str, Any]
MASK_SUFFIX = ".png"
_ORIENTATION_TAG = 0x0112


@dataclass
class PseudoListing:
    """The images a pseudo-mask folder covers: ``names`` (split order) have a mask,
    ``missing`` (split order) do not."""

    folder: Path
    split: str
    names: List[str]
    missing: List[str] = field(default_factory=list)

    def mask_path(self, name: str) -> Path:
        return self.folder / f"{name}{MASK_SUFFIX}"


def list_pseudo_masks(folder: str | Path, split_names: Sequence[str], split: str = "train") -> PseudoListing:
    """Match a folder of masks against a split's names (no file is decoded).

    Raises :class:`VitpcmError` for a missing or empty folder, a folder of probabilities
    (``NAME.npz`` of ``vitpcm infer``) instead of masks, a ``pseudo/SPLIT`` folder given
    instead of one of its ``masks/`` / ``crf/``, and a folder that shares no name with the split.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VitpcmError(
            f"--pseudo {folder}: folder not found (give a folder of PNG masks, e.g. RUN/pseudo/train/crf)"
        )
    masks = set(names_in(folder, MASK_SUFFIX))
    if not masks:
        if names_in(folder, ".npz"):
            raise VitpcmError(
                f"--pseudo {folder} holds probabilities (NAME.npz), not masks: give the masks/ or crf/ folder"
                f" beside it (e.g. {folder.parent / 'crf'}, the CRF-refined masks the paper trains on)"
            )
        subfolders = [p.name for p in (folder / "crf", folder / "masks") if p.is_dir()]
        if subfolders:
            raise VitpcmError(
                f"--pseudo {folder} has no masks itself but holds {' and '.join(f'{s}/' for s in subfolders)}:"
                f" give one of them, e.g. --pseudo {folder / subfolders[0]}"
            )
        raise VitpcmError(
            f"--pseudo {folder} holds no PNG masks: give a folder of palette or greyscale PNGs NAME.png"
            " (class indices, 255 = ignore), e.g. RUN/pseudo/train/crf of `vitpcm infer --crf`"
        )
    names = [n for n in split_names if n in masks]
    missing = [n for n in split_names if n not in masks]
    if not names:
        example = sorted(masks)[0]
        raise VitpcmError(
            f"--pseudo {folder}: none of the {len(split_names)} images of split '{split}' has a mask there"
            f" (it holds e.g. {example}{MASK_SUFFIX}, the split e.g. {format_names(list(split_names), 2)}):"
            " pseudo-masks of another split or dataset? (data.train_split, data.root)"
        )
    return PseudoListing(folder, split, names, missing)


def displayed_size(path: str | Path) -> Tuple[int, int]:
    """``(H, W)`` of an image as displayed (EXIF rotations of 90 degrees swap the sides),
    read from the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(_ORIENTATION_TAG, 1) in (5, 6, 7, 8):
                w, h = h, w
    except (OSError, SyntaxError, ValueError) as exc:
        raise VitpcmError(f"cannot read image {path}: {exc}") from None
    return h, w


def check_pseudo_mask(mask_path: Path, image_path: Path, num_classes: int) -> Optional[str]:
    """The problem of one mask as one line naming the file and the fix, or None."""
    try:
        mask = read_mask_png(mask_path)
    except VitpcmError as exc:
        return (
            f"{exc}: write the masks as palette or greyscale PNGs of class indices (`vitpcm infer` / `vitpcm crf` do)"
        )
    h, w = displayed_size(image_path)
    if mask.shape != (h, w):
        return (
            f"{mask_path}: the mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is {w}x{h}:"
            " pseudo-masks must have the original image size (make them with `vitpcm infer` on this dataset)"
        )
    values = np.unique(mask)
    bad = [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        return (
            f"{mask_path}: mask values {bad} lie outside the {num_classes} classes (0..{num_classes - 1},"
            " 255 = ignore): give the class list the masks were made with (data.classes) or fix the masks"
        )
    return None


def check_pseudo_masks(
    listing: PseudoListing, image_path: Any, num_classes: int, workers: int = 0, progress: bool = False
) -> None:
    """Read every mask of ``listing`` once; raise one :class:`VitpcmError` for the first bad
    one (in split order), saying how many more are bad.

    ``image_path``: ``name -> Path`` of the image (the dataset's :meth:`image_path`).
    """

    def one(name: str) -> Optional[str]:
        return check_pseudo_mask(listing.mask_path(name), Path(image_path(name)), num_classes)

    n = resolve_workers(workers)
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        results = list(tqdm(pool.map(one, listing.names), total=len(listing.names), desc="check pseudo-masks",
                            unit="mask", disable=not progress, leave=False))  # fmt: skip
    bad = [r for r in results if r is not None]
    if bad:
        more = f" ({len(bad) - 1} more masks have problems)" if len(bad) > 1 else ""
        raise VitpcmError(bad[0] + more)


#: The older name of :func:`check_pseudo_masks`; kept as an alias.
screen_pseudo_masks = check_pseudo_masks


class PseudoMaskDataset(Dataset):
    """The images of ``base`` (any :class:`~vitpcm.data.base.TaggedImageDataset`) listed in
    ``listing``, each with its pseudo-mask.

    Item (before ``transform``): ``{"image": uint8 [3, H, W], "mask": int64 [H, W]
    (255 = ignore), "name": str, "size": (H, W)}``.
    """

    def __init__(self, base: Any, listing: PseudoListing, transform: Any = None) -> None:
        self.base = base
        self.listing = listing
        self.names = list(listing.names)
        self.classes = list(base.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def raw(self, index: int) -> Sample:
        name = self.names[index]
        path = self.base.image_path(name)
        try:
            image, _ = decode_image(path)
        except ImageReadError as exc:
            raise VitpcmError(f"{path}: the image cannot be decoded ({exc}): replace it") from None
        mask = read_mask_png(self.listing.mask_path(name))
        if mask.shape != image.shape[:2]:  # screened before training; a file changed since
            raise VitpcmError(f"{self.listing.mask_path(name)}: size differs from its image {path}")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "name": name,
            "size": image.shape[:2],
        }

    def __getitem__(self, index: int) -> Sample:
        sample = self.raw(index)
        return self.transform(sample) if self.transform is not None else sample


class SegmentTrainTransform:
    """DeepLab's training augmentation (kazuto1011's ``_augmentation``), on torch tensors.

    1. scale by one factor drawn from ``scales`` (image bilinear, mask nearest);
    2. normalise with ``mean`` / ``std``; pad bottom / right up to ``crop`` (image with 0,
       i.e. the mean colour as kazuto1011 pads; mask with 255 = ignore);
    3. a random ``crop`` x ``crop`` window; 4. a horizontal flip with probability 0.5
       (``flip``).

    Random draws use torch's global generator (seeded by the engine; per worker in loaders).
    Output: ``{"image": float [3, crop, crop], "mask": int64 [crop, crop], "name"}``.
    """

    def __init__(
        self,
        crop: int,
        scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5),
        flip: bool = True,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        self.crop = int(crop)
        self.scales = [float(s) for s in scales] or [1.0]
        self.flip = bool(flip)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def __call__(self, sample: Sample) -> Sample:
        image, mask = sample["image"], sample["mask"]
        h, w = mask.shape[-2:]
        s = self.scales[int(torch.randint(len(self.scales), ()))]
        size = (max(1, int(h * s)), max(1, int(w * s)))
        x = image.float()[None] / 255.0
        y = mask[None, None].float()
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="nearest-exact")
        x = to_model_input(x[0], self.mean, self.std)
        y = y[0, 0].long()
        c = self.crop
        ph, pw = max(c - size[0], 0), max(c - size[1], 0)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
        hh, ww = y.shape
        top = int(torch.randint(hh - c + 1, ()))
        left = int(torch.randint(ww - c + 1, ()))
        x, y = x[:, top : top + c, left : left + c], y[top : top + c, left : left + c]
        if self.flip and bool(torch.rand(()) < 0.5):
            x, y = x.flip(-1), y.flip(-1)
        return {"image": x.contiguous(), "mask": y.contiguous(), "name": sample["name"]}


class SegmentEvalTransform:
    """The whole image, normalised (``[3, H, W]`` float); the mask stays as it is."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        out["image"] = to_model_input(sample["image"], self.mean, self.std)
        return out


def segment_collate(samples: List[Sample]) -> Sample:
    """Stack ``image`` / ``mask`` (same size within a batch); ``name`` / ``size`` as lists;
    other keys (``labels``) stacked when tensors."""
    out: Sample = {"name": [s["name"] for s in samples]}
    if "size" in samples[0]:
        out["size"] = [tuple(s["size"]) for s in samples]
    for key in samples[0]:
        if key in out:
            continue
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
