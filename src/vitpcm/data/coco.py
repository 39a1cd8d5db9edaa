"""COCO 2014 (or 2017) instance annotations as semantic masks, 81 classes.

::

    ROOT/train2014/COCO_train2014_000000000009.jpg     (ROOT/images/train2014/ works too)
    ROOT/val2014/...
    ROOT/annotations/instances_{train,val}2014.json
    MASKS/{train2014,val2014}/NAME.png                 optional: `vitpcm prepare coco`

Split ``train`` means ``train2014`` (``val`` -> ``val2014``; ``train2017`` etc. are used as
given). Classes: background + the 80 categories, mapped by name onto the class list
(``data.classes=coco14`` is the authors' ``labels.txt``, which is COCO's id order); without
a class list, background + the categories in id order (the same list).

Masks (``[H, W]`` uint8): crowd regions are 255 (ignore); then every other instance is
painted with its class, largest area first, so a small object in front of a large one
stays visible (ties: lower annotation id first). Polygons, compressed and uncompressed
RLE are all rasterised with pycocotools. When ``MASKS/SPLIT/NAME.png`` exists it is read
instead (``vitpcm prepare coco`` writes them once, so training does not re-rasterise every
epoch); otherwise the mask is drawn on the fly.

Tags: every category annotated in the image, crowd regions included (the class is visible,
and the authors' masks paint crowds with their class). Images without any non-crowd
annotation are left out of the split, as the authors do (their counts: 81,477 train /
39,884 val, after also dropping images under 256 px, which vitpcm keeps).

``gt="authors"`` (``data.coco_gt=authors``, the ``coco14`` preset) makes the authors' ground
truth instead (their ``datasets/parse_coco.py``): every annotation in file order is painted
where nothing is painted yet (the first one wins), crowd regions with their class; images
with a side under 256 px, or whose mask holds a single value (nothing annotated, or one
class everywhere), are left out; tags come from the mask. ``vitpcm prepare coco --gt
authors`` writes these masks (and records ``authors`` in ``MASKS/gt.txt``; the loader
refuses masks prepared for the other ground truth).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from vitpcm.atomic import write_text_atomic
from vitpcm.classes import IGNORE_INDEX, class_list
from vitpcm.data.base import DUPLICATE_NAME, MISSING_IMAGE, Sample, TaggedImageDataset, tag_vector
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png, save_mask_png
from vitpcm.utils.pools import process_pool
from vitpcm.utils.system import resolve_workers

log = logging.getLogger(__name__)
BAD_ANNOTATION = "bad-annotation"
GT_KINDS = ("vitpcm", "authors")
AUTHORS_MIN_SIDE = 256  # parse_coco.py: images with a side under this are left out


def split_dir(split: str) -> str:
    """``train`` -> ``train2014``; a split that already ends in a year is kept."""
    return split if split[-4:].isdigit() else f"{split}2014"


@dataclass
class _Image:
    file_name: str
    size: Tuple[int, int]  # (H, W) from the annotations
    tags: List[int] = field(default_factory=list)  # class indices, crowd included
    anns: List[Tuple[int, int, int, Any]] = field(default_factory=list)  # (class, iscrowd, id, segmentation)
    prepared: bool = False  # a prepared PNG exists (then ``anns`` is emptied to save memory)


def _to_rle(segm: Any, h: int, w: int) -> Optional[dict]:
    """One annotation's segmentation (polygons, RLE) -> one compressed RLE; None if empty."""
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) >= 6]  # fewer than 3 points enclose nothing
        if not polys:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, h, w)  # uncompressed RLE (crowd regions)
    if isinstance(segm, dict) and "counts" in segm:
        return segm
    raise ValueError(f"unknown segmentation format {type(segm).__name__}")


def rasterize(anns: Sequence[Tuple[int, int, int, Any]], h: int, w: int, gt: str = "vitpcm") -> np.ndarray:
    """``[H, W]`` uint8 mask from ``(class, iscrowd, ann_id, segmentation)`` tuples in file order.

    ``gt="vitpcm"``: crowd regions 255 first, then instances by decreasing area. ``"authors"``
    (their ``_gen_seg_mask``): each annotation, crowds included, painted with its class where
    the mask is still 0, so the first one in the file wins (module docstring).
    """
    if gt not in GT_KINDS:
        raise ValueError(f"gt must be one of {GT_KINDS}, got {gt!r}")
    mask = np.zeros((h, w), dtype=np.uint8)
    instances = []
    for cls, crowd, ann_id, segm in anns:
        try:
            rle = _to_rle(segm, h, w)
        except Exception as exc:  # pycocotools raises TypeError/ValueError on malformed input
            raise VitpcmError(f"cannot rasterise annotation id {ann_id}: {exc}") from None
        if rle is None:
            continue
        if gt == "authors":
            mask[(mask_utils.decode(rle) > 0) & (mask == 0)] = cls
        elif crowd:
            mask[mask_utils.decode(rle) > 0] = IGNORE_INDEX
        else:
            instances.append((-int(mask_utils.area(rle)), ann_id, cls, rle))
    for _, _, cls, rle in sorted(instances, key=lambda t: (t[0], t[1])):
        mask[mask_utils.decode(rle) > 0] = cls
    return mask


class COCODataset(TaggedImageDataset):
    """One split of COCO (module docstring).

    Args:
        root: the folder that holds ``annotations/`` and ``train2014/`` / ``val2014/``.
        split: ``train``, ``val`` (2014), or e.g. ``val2017``.
        classes: class list (file, built-in name, or names); default from the annotations.
        masks: folder of prepared masks (``vitpcm prepare coco --out``); default ``ROOT/masks``.
        use_prepared: read prepared PNGs when present (``prepare`` itself sets False).
        strict: raise on listing problems (missing images, duplicate names).
        gt: ``"vitpcm"`` or ``"authors"`` ground truth and image filter (module docstring).
        value_filter: with ``gt="authors"``, drop single-valued masks now (rasterising each
            mask unless prepared ones list the survivors); ``prepare`` sets False and filters
            while it writes.
    """

    format = "coco"

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Optional[Sequence[str] | str | Path] = None,
        transform: Optional[Callable[[Sample], Sample]] = None,
        masks: Optional[str | Path] = None,
        use_prepared: bool = True,
        strict: bool = True,
        gt: str = "vitpcm",
        value_filter: bool = True,
    ) -> None:
        if gt not in GT_KINDS:
            raise VitpcmError(f"data.coco_gt must be one of {', '.join(GT_KINDS)}, got {gt!r}")
        self.gt = gt
        root = Path(root)
        if not root.is_dir():
            raise VitpcmError(
                f"dataset folder {root} not found: set data.root to the COCO folder (annotations/, train2014/)"
            )
        self.split_dir = split_dir(split)
        ann_file = root / "annotations" / f"instances_{self.split_dir}.json"
        if not ann_file.is_file():
            found = sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
            raise VitpcmError(f"split '{split}': {ann_file} not found (annotation files there: {found or 'none'})")
        self.image_dir = next(
            (d for d in (root / self.split_dir, root / "images" / self.split_dir) if d.is_dir()), None
        )
        if self.image_dir is None:
            raise VitpcmError(
                f"split '{split}': no image folder {root / self.split_dir} (unpack {self.split_dir}.zip there)"
            )
        self.ann_file = ann_file
        data = _load_json(ann_file)
        try:
            cats = sorted(data.get("categories", []), key=lambda c: int(c["id"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise VitpcmError(f"{ann_file}: bad categories list ({exc})") from None
        if classes is None:
            names = ["background"] + [c["name"] for c in cats]
        elif isinstance(classes, (str, Path)):
            names = class_list(classes)
        else:
            names = list(classes)
        super().__init__(root, split, names, transform)
        index = {c: i for i, c in enumerate(self.classes)}
        cat_index: Dict[int, int] = {}
        for c in cats:
            if c["name"] not in index:
                raise VitpcmError(
                    f"category '{c['name']}' (id {c['id']}) of {ann_file.name} is not in the class list:"
                    " give the COCO class list (data.classes=coco14) or leave data.classes unset"
                )
            cat_index[int(c["id"])] = index[c["name"]]

        masks_root = Path(masks) if masks else root / "masks"
        self.prepared_dir = masks_root / self.split_dir
        made_for = masks_root / "classes.txt"  # written by prepare_coco: PNG values index this list
        if use_prepared and self.prepared_dir.is_dir() and made_for.is_file() and class_list(made_for) != self.classes:
            raise VitpcmError(
                f"the masks in {masks_root} were prepared for another class list ({made_for}): run"
                " `vitpcm prepare coco` again with the same classes as data.classes, into an empty --out"
            )
        prepared_gt = prepared_gt_of(masks_root)
        if use_prepared and self.prepared_dir.is_dir() and prepared_gt != gt:
            raise VitpcmError(
                f"the masks in {masks_root} were prepared with data.coco_gt={prepared_gt}, this run asks for {gt}:"
                f" run `vitpcm prepare coco --gt {gt}` into another --out and set data.masks to it"
            )
        self.has_masks = True
        self._images: Dict[str, _Image] = {}
        bad: Dict[str, List[str]] = {}
        by_id: Dict[int, _Image] = {}
        order: List[str] = []
        try:
            for img in data["images"]:
                by_id[int(img["id"])] = _Image(img["file_name"], (int(img["height"]), int(img["width"])))
            for ann in data["annotations"]:
                rec = by_id.get(int(ann["image_id"]))
                if rec is None:
                    continue
                cls = cat_index.get(int(ann["category_id"]))
                if cls is None:
                    why = f"annotation {ann.get('id')} has unknown category id {ann['category_id']}"
                    bad.setdefault(rec.file_name, []).append(why)
                    continue
                crowd = int(ann.get("iscrowd", 0))
                rec.anns.append((cls, crowd, int(ann.get("id", 0)), ann.get("segmentation")))
                if cls not in rec.tags:
                    rec.tags.append(cls)
        except (KeyError, TypeError, ValueError) as exc:
            raise VitpcmError(f"{ann_file} is not a valid COCO instances file ({type(exc).__name__}: {exc})") from None
        dropped = small = 0
        seen: Dict[str, int] = {}
        for rec in by_id.values():
            if gt == "authors":
                if min(rec.size) < AUTHORS_MIN_SIDE:
                    small += 1  # parse_coco.py's size filter
                    continue
            elif not any(not crowd for _, crowd, _, _ in rec.anns) and rec.file_name not in bad:
                dropped += 1  # nothing but crowd regions (or nothing at all): no object to learn
                continue
            name = PurePosixPath(rec.file_name).stem
            seen[name] = seen.get(name, 0) + 1
            if name not in self._images:
                self._images[name] = rec
                order.append(name)
        del data  # the raw JSON is large; only the compact records stay
        self.names = sorted(order)
        if gt == "authors":
            single = self._single_valued(use_prepared and value_filter, value_filter, bad)
            self.names = [n for n in self.names if n not in single]
            self.info.append(
                f"authors' ground truth: {small} images with a side under {AUTHORS_MIN_SIDE} px and"
                f" {len(single)} with a single mask value left out (docs/reproduce.md)"
            )
        else:
            self.info.append(f"{dropped} images without a non-crowd annotation left out (docs/datasets.md)")
        for name in self.names:
            rec = self._images[name]
            if seen[name] > 1:
                self.add_problem(name, DUPLICATE_NAME, ann_file,
                                 f"{seen[name]} images are named '{name}': names must be unique")  # fmt: skip
            if rec.file_name in bad:
                self.add_problem(
                    name, BAD_ANNOTATION, ann_file, "; ".join(bad[rec.file_name]) + ": fix the annotation file"
                )
            if not (self.image_dir / rec.file_name).is_file():
                self.add_problem(name, MISSING_IMAGE, self.image_dir / rec.file_name,
                                 f"image listed in {ann_file.name} is missing: unpack {self.split_dir}.zip again")  # fmt: skip
            rec.tags.sort()
            rec.prepared = use_prepared and (self.prepared_dir / f"{name}.png").is_file()
            if rec.prepared:
                rec.anns = []  # memory: the PNG replaces the polygons
        n_prepared = sum(self._images[n].prepared for n in self.names)
        self.info.append(
            f"masks: {n_prepared} read from {self.prepared_dir}, {len(self.names) - n_prepared} rasterised on the fly"
        )
        if strict:
            self.raise_listing_problems()

    def _single_valued(self, use_list: bool, rasterise: bool, bad: Dict[str, List[str]]) -> set:
        """Names whose authors' mask holds fewer than 2 values. From the list a prepare run
        wrote (``MASKS/SPLIT.txt``: its survivors) when allowed, else by rasterising each mask."""
        listed = self.prepared_dir.parent / f"{self.split_dir}.txt"
        if use_list and self.prepared_dir.is_dir() and listed.is_file():
            keep = set(listed.read_text(encoding="utf-8").split())
            return {n for n in self.names if n not in keep}
        if not rasterise:
            return set()
        if len(self.names) > 1000:
            log.info("%s: rasterising %d masks for the authors' single-value filter (`vitpcm prepare coco"
                     " --gt authors` once saves this)", self.split_dir, len(self.names))  # fmt: skip
        out = set()
        for name in self.names:
            rec = self._images[name]
            if rec.file_name in bad:
                continue  # reported by the check, not filtered
            try:
                mask = rasterize(rec.anns, *rec.size, gt="authors")
            except VitpcmError:
                continue
            if len(np.unique(mask)) < 2:
                out.add(name)
        return out

    def image_path(self, name: str) -> Path:
        return self.image_dir / self._images[name].file_name

    def mask_path(self, name: str) -> Optional[Path]:
        rec = self._images[name]
        return self.prepared_dir / f"{name}.png" if rec.prepared else self.ann_file

    def expected_size(self, name: str) -> Optional[Tuple[int, int]]:
        return self._images[name].size

    def file_tags(self, name: str) -> Optional[np.ndarray]:
        if self.gt == "authors":
            return None  # the authors' tags come from their mask
        return tag_vector(self._images[name].tags, self.num_classes)

    def read_mask(self, name: str, size: Tuple[int, int]) -> np.ndarray:
        rec = self._images[name]
        if rec.prepared:
            return read_mask_png(self.prepared_dir / f"{name}.png")
        h, w = rec.size
        try:
            return rasterize(rec.anns, h, w, gt=self.gt)
        except VitpcmError as exc:
            raise VitpcmError(f"{name}: {exc}") from None


def prepared_gt_of(masks_root: Path) -> str:
    """The ground truth a prepare run wrote into ``masks_root`` (``gt.txt``; before it existed: vitpcm)."""
    marker = Path(masks_root) / "gt.txt"
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else "vitpcm"


def _load_json(path: Path) -> Dict[str, Any]:
    log.info("reading %s", path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VitpcmError(f"cannot read annotation file {path}: {exc} (download it again)") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise VitpcmError(f"{path} is not a COCO instances file (needs images, annotations, categories)")
    return data


# ----------------------------------------------------------------------------- prepare
_PREPARE: Dict[str, Any] = {}  # the dataset being prepared, inherited by forked workers
_POOL_MIN = 64  # fewer masks than this: one process is faster than starting a pool


SINGLE_VALUED = "\0single"  # _prepare_one's answer for a mask the authors' filter drops


def _prepare_one(name: str) -> str:
    ds: COCODataset = _PREPARE["ds"]
    out: Path = _PREPARE["out"]
    rec = ds._images[name]
    try:
        mask = rasterize(rec.anns, *rec.size, gt=ds.gt)
    except VitpcmError as exc:
        return f"{name}: {exc}"
    if ds.gt == "authors" and len(np.unique(mask)) < 2:
        return SINGLE_VALUED  # parse_coco.py drops it: no PNG, not in the list
    save_mask_png(out / f"{name}.png", mask)
    return ""


def prepare_coco(
    root: str | Path,
    out: Optional[str | Path] = None,
    splits: Sequence[str] = ("train", "val"),
    classes: Optional[str] = None,
    workers: int = 0,
    progress: bool = True,
    gt: str = "vitpcm",
) -> Dict[str, Dict[str, int]]:
    """Rasterise every mask of ``splits`` once into ``OUT/SPLIT/NAME.png`` (default
    ``OUT = ROOT/masks``) and write the split's names to ``OUT/SPLIT.txt`` and the class
    list the PNG values index to ``OUT/classes.txt`` (the loader refuses other lists).
    ``gt``: ``vitpcm`` or ``authors`` masks (:class:`COCODataset`), recorded in ``OUT/gt.txt``;
    with ``authors``, single-valued masks are not written nor listed (``dropped``).

    Resumable: masks already there are kept (delete ``OUT`` after changing the annotations).
    Each PNG is written atomically. Returns ``{split: {"written", "kept", "failed"}}``.
    """
    out_root = Path(out) if out else Path(root) / "masks"
    result: Dict[str, Dict[str, int]] = {}
    n_workers = resolve_workers(workers)
    for split in splits:
        ds = COCODataset(root, split, classes=classes, use_prepared=False, strict=False, gt=gt, value_filter=False)
        made_for = out_root / "classes.txt"
        if made_for.is_file() and class_list(made_for) != ds.classes:
            raise VitpcmError(f"{out_root} holds masks made for another class list ({made_for}): choose an empty --out")
        if (out_root / "classes.txt").is_file() and prepared_gt_of(out_root) != gt:
            raise VitpcmError(
                f"{out_root} holds masks made with --gt {prepared_gt_of(out_root)}: choose an empty --out for --gt {gt}"
            )
        out_dir = out_root / ds.split_dir
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(made_for, "".join(f"{c}\n" for c in ds.classes))
            write_text_atomic(out_root / "gt.txt", f"{gt}\n")
        except OSError as exc:
            raise VitpcmError(
                f"cannot write to {out_root} ({exc}): choose a writable --out and set data.masks to it"
            ) from None
        todo = [n for n in ds.names if n not in ds.listing_problems and not (out_dir / f"{n}.png").is_file()]
        kept = sum((out_dir / f"{n}.png").is_file() for n in ds.names)
        failures: List[str] = []
        single: List[str] = []
        _PREPARE.update(ds=ds, out=out_dir)
        bar = tqdm(total=len(todo), desc=f"prepare {ds.split_dir}", unit="mask", disable=not progress)
        try:
            if n_workers > 1 and len(todo) > _POOL_MIN and "fork" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("fork")  # workers inherit the parsed annotations
                with process_pool(n_workers, mp_context=ctx) as pool:  # workers die with this process
                    for name, msg in zip(todo, pool.map(_prepare_one, todo, chunksize=32)):
                        single += [name] if msg == SINGLE_VALUED else []
                        failures += [msg] if msg and msg != SINGLE_VALUED else []
                        bar.update()
            else:
                for name in todo:
                    msg = _prepare_one(name)
                    single += [name] if msg == SINGLE_VALUED else []
                    failures += [msg] if msg and msg != SINGLE_VALUED else []
                    bar.update()
        finally:
            bar.close()
            _PREPARE.clear()
        for msg in failures:
            log.warning("could not rasterise %s", msg)
        skipped = len(ds.listing_problems)
        if skipped:
            log.warning(
                "%s: %d images with problems were not prepared (`vitpcm check-data` lists them)", ds.split_dir, skipped
            )
        dropped = set(single)  # a resumed run meets earlier drops again: they never get a PNG
        listed = [n for n in ds.names if n not in dropped]
        write_text_atomic(out_root / f"{ds.split_dir}.txt", "".join(f"{n}\n" for n in listed))
        result[ds.split_dir] = {"written": len(todo) - len(failures) - len(single), "kept": kept,
                                "failed": len(failures), "problems": skipped}  # fmt: skip
        if gt == "authors":
            result[ds.split_dir]["dropped"] = len(ds.names) - len(listed)
    return result
