"""Tiny fixtures in each real dataset format, written by the tests themselves.

Every builder returns the masks it drew (``{name: [H, W] uint8}``), so loaders can be
checked against them pixel for pixel. Images are small random-noise pictures.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from vitpcm.io import save_mask_png


def noise_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def draw_mask(h: int, w: int, boxes: Sequence[Tuple[int, int, int, int, int]], border: bool = True) -> np.ndarray:
    """Background mask with filled boxes ``(class, y0, x0, y1, x1)``; a 255 ring around
    each box when ``border`` (as VOC draws object outlines)."""
    mask = np.zeros((h, w), np.uint8)
    for cls, y0, x0, y1, x1 in boxes:
        if border:
            mask[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = 255
        mask[y0:y1, x0:x1] = cls
    return mask


def save_jpg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def write_lines(path: Path, names: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))


# ----------------------------------------------------------------------------- VOC + SBD
VOC_TRAIN = ["a", "b", "c"]
VOC_VAL = ["d", "e"]
SBD_TRAIN = ["b", "f", "g", "d"]
SBD_VAL = ["h", "e"]
TRAINAUG = sorted((set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL))  # a b c f g h


def _boxes(seed: int, h: int, w: int) -> List[Tuple[int, int, int, int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(rng.integers(1, 3))):
        cls = int(rng.integers(1, 21))
        y0, x0 = int(rng.integers(1, h // 2)), int(rng.integers(1, w // 2))
        out.append((cls, y0, x0, y0 + int(rng.integers(3, h // 2)), x0 + int(rng.integers(3, w // 2))))
    return out


def make_voc(root: Path, sbd: str = "none") -> Dict[str, Dict[str, np.ndarray]]:
    """``root/VOCdevkit/VOC2012`` with train a b c, val d e, test t1 t2 (no masks), and
    ``sbd`` = ``"none"``, ``"release"`` (``root/benchmark_RELEASE``) or ``"converted"``
    (``VOC2012/SegmentationClassAug`` + ``VOC2012/train_aug.txt``).

    Returns ``{"voc": masks in SegmentationClass, "sbd": SBD masks}``; SBD's mask of b
    differs from VOC's on purpose (VOC's must win)."""
    voc = root / "VOCdevkit" / "VOC2012"
    all_names = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))
    voc_masks: Dict[str, np.ndarray] = {}
    sbd_masks: Dict[str, np.ndarray] = {}
    for i, n in enumerate(all_names + ["t1", "t2"]):
        h, w = 18 + i % 3, 22 + 2 * (i % 2)
        if n != "h":  # h exists only in SBD's img/ (tests the fallback)
            save_jpg(voc / "JPEGImages" / f"{n}.jpg", noise_image(h, w, i))
        if n in VOC_TRAIN + VOC_VAL:
            voc_masks[n] = draw_mask(h, w, _boxes(i, h, w))
            save_mask_png(voc / "SegmentationClass" / f"{n}.png", voc_masks[n])
        if n in SBD_TRAIN + SBD_VAL:
            sbd_masks[n] = draw_mask(h, w, _boxes(100 + i, h, w), border=False)  # SBD: no 255 border
    write_lines(voc / "ImageSets/Segmentation/train.txt", VOC_TRAIN)
    write_lines(voc / "ImageSets/Segmentation/val.txt", VOC_VAL)
    write_lines(voc / "ImageSets/Segmentation/trainval.txt", VOC_TRAIN + VOC_VAL)
    write_lines(voc / "ImageSets/Segmentation/test.txt", ["t1", "t2"])
    if sbd == "release":
        import scipy.io

        ds = root / "benchmark_RELEASE" / "dataset"
        for n, m in sbd_masks.items():
            (ds / "cls").mkdir(parents=True, exist_ok=True)
            gt = {"Segmentation": m, "Boundaries": np.zeros((1, 20), object), "CategoriesPresent": np.unique(m[m > 0])}
            scipy.io.savemat(ds / "cls" / f"{n}.mat", {"GTcls": gt})
        save_jpg(ds / "img" / "h.jpg", noise_image(*sbd_masks["h"].shape, 77))
        write_lines(ds / "train.txt", SBD_TRAIN)
        write_lines(ds / "val.txt", SBD_VAL)
    elif sbd == "converted":
        aug = voc / "SegmentationClassAug"
        aug.mkdir(parents=True)
        for n in sbd_masks:
            Image.fromarray(sbd_masks[n]).save(aug / f"{n}.png")  # greyscale, as in the zip
        for n in VOC_TRAIN:  # the zip covers VOC's own images too
            Image.fromarray(voc_masks[n]).save(aug / f"{n}.png")
        save_jpg(voc / "JPEGImages" / "h.jpg", noise_image(*sbd_masks["h"].shape, 77))
        # both line forms in circulation; no val name (the standard list has none)
        lines = [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png" if i % 2 else n for i, n in enumerate(TRAINAUG)]
        write_lines(voc / "train_aug.txt", lines)
    return {"voc": voc_masks, "sbd": sbd_masks}


# ----------------------------------------------------------------------------- COCO
COCO_CATS = [(1, "person"), (17, "cat"), (18, "dog"), (62, "chair")]  # real ids, non-contiguous


def rect_poly(y0: int, x0: int, y1: int, x1: int) -> List[float]:
    """A polygon that pycocotools rasterises to exactly mask[y0:y1, x0:x1]."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros), by hand."""
    flat = m.T.reshape(-1).astype(bool)
    counts, current, run = [], False, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}


def make_coco(root: Path) -> Dict[str, np.ndarray]:
    """``root`` with train2014 (4 images, 2 kept) and val2014 (1 image), instances JSON
    with polygons, a compressed RLE, a crowd region (uncompressed RLE), a crowd-only image
    and an image without annotations. Returns the expected masks by name (class indices
    of the coco14 list: person 1, cat 16, dog 17, chair 57)."""
    from pycocotools import mask as mask_utils

    from vitpcm.classes import class_list

    coco14 = class_list("coco14")
    idx = {name: coco14.index(name) for _, name in COCO_CATS}
    expected: Dict[str, np.ndarray] = {}
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATS]

    def split(split: str, specs) -> None:
        images, anns = [], []
        for img_id, (h, w, items) in enumerate(specs, start=1):
            name = f"COCO_{split}_{img_id:012d}"
            save_jpg(root / split / f"{name}.jpg", noise_image(h, w, img_id))
            images.append({"id": img_id, "file_name": f"{name}.jpg", "height": h, "width": w})
            exp = np.zeros((h, w), np.uint8)
            for k, (cat, crowd, kind, box) in enumerate(items):
                m = np.zeros((h, w), np.uint8)
                m[box[0] : box[2], box[1] : box[3]] = 1
                if kind == "poly":
                    seg = [rect_poly(*box)]
                elif kind == "rle":
                    rle = mask_utils.encode(np.asfortranarray(m))
                    seg = {"size": rle["size"], "counts": rle["counts"].decode()}
                else:
                    seg = uncompressed_rle(m)
                cat_id = next(i for i, n in COCO_CATS if n == cat)
                bbox = [box[1], box[0], box[3] - box[1], box[2] - box[0]]
                anns.append({"id": 1000 * img_id + k, "image_id": img_id, "category_id": cat_id, "iscrowd": int(crowd),
                             "segmentation": seg, "area": float(m.sum()), "bbox": bbox})  # fmt: skip
            # expected: crowd -> 255, then instances largest first
            for _, crowd, _, box in items:
                if crowd:
                    exp[box[0] : box[2], box[1] : box[3]] = 255
            inst = [(-(b[2] - b[0]) * (b[3] - b[1]), c, b) for c, crowd, _, b in items if not crowd]
            for _, cat, box in sorted(inst, key=lambda t: t[0]):
                exp[box[0] : box[2], box[1] : box[3]] = idx[cat]
            if any(not crowd for _, crowd, _, _ in items):
                expected[name] = exp
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )

    split("train2014", [
        # a large person with a small dog in front (drawn after it in the file, and before: order must not matter)
        (20, 24, [("dog", False, "poly", (6, 8, 10, 12)), ("person", False, "poly", (2, 3, 18, 20))]),
        # a cat as compressed RLE, a crowd of people (ignore) partly under a chair polygon
        (16, 18, [("cat", False, "rle", (1, 1, 7, 9)), ("person", True, "crowd", (8, 2, 15, 16)),
                  ("chair", False, "poly", (10, 10, 14, 14))]),
        (14, 14, [("person", True, "crowd", (2, 2, 9, 9))]),  # crowd only: left out
        (15, 15, []),  # no annotation: left out
    ])  # fmt: skip
    split("val2014", [(18, 20, [("chair", False, "poly", (3, 4, 12, 15)), ("cat", False, "rle", (5, 5, 9, 9))])])
    return expected


# ----------------------------------------------------------------------------- own folder
def make_folder(root: Path) -> Dict[str, np.ndarray]:
    """``root/images`` (a.jpg, b.png, sub/c.jpeg), ``tags.csv`` in three row styles, masks
    for a and b only. Classes inferred: background, bird, cat, dog."""
    masks = {"a": draw_mask(16, 20, [(2, 3, 3, 9, 9)]), "b": draw_mask(18, 14, [(1, 2, 2, 8, 8), (3, 10, 3, 15, 10)])}
    save_jpg(root / "images" / "a.jpg", noise_image(16, 20, 1))
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise_image(18, 14, 2)).save(root / "images" / "b.png")
    save_jpg(root / "images" / "sub" / "c.jpeg", noise_image(12, 12, 3))
    (root / "tags.csv").write_text('image,tags\na.jpg,cat\nb.png,"bird;dog"\nsub/c,dog,cat\n')
    for n, m in masks.items():
        save_mask_png(root / "masks" / f"{n}.png", m)
    return masks


def png_16bit_rgb(path: Path, arr: np.ndarray) -> None:
    """Write a 48-bit RGB PNG by hand (Pillow cannot): ``arr`` [H, W, 3] uint16."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()
