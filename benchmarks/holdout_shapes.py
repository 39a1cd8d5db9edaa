"""A second, independent VOC-layout shapes set for checking that the CPU preset generalises.

It shares no code, classes, shapes, textures, palette or size range with the built-in
generator (``vitpcm.data.synthetic``): four other classes, larger images, blob backgrounds,
wider colour ranges. It was written once, before any tuning of the preset, and is not to
be tuned to the model. Usage::

    python benchmarks/holdout_shapes.py OUT [--train 300] [--val 100] [--seed 7]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["background", "triangle", "cross", "hexagon", "crescent"]
PALETTE = np.zeros((256, 3), dtype=np.uint8)
PALETTE[:5] = [[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]]
PALETTE[255] = [255, 255, 255]


def blob_background(rng, h, w):
    img = np.full((h, w, 3), rng.uniform(60, 200, size=3), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(4, 10)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(0.08, 0.35) * max(h, w)
        wgt = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None]
        img = img * (1 - 0.7 * wgt) + rng.uniform(0, 255, size=3) * 0.7 * wgt
    img += rng.normal(0, 6, size=img.shape)
    return img


def outline(kind, rng, r):
    if kind == "triangle":
        a = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.2, 0.2, 3)
        return [np.stack([r * np.cos(a), r * np.sin(a)], 1)]
    if kind == "cross":
        t = r * rng.uniform(0.28, 0.4)
        pts = [
            (-t, -r),
            (t, -r),
            (t, -t),
            (r, -t),
            (r, t),
            (t, t),
            (t, r),
            (-t, r),
            (-t, t),
            (-r, t),
            (-r, -t),
            (-t, -t),
        ]
        return [np.array(pts)]
    if kind == "hexagon":
        a = np.arange(6) * math.pi / 3
        return [np.stack([r * np.cos(a), r * rng.uniform(0.7, 1.0) * np.sin(a)], 1)]
    if kind == "crescent":
        a = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        off = r * rng.uniform(0.35, 0.55)
        return [
            np.stack([r * np.cos(a), r * np.sin(a)], 1),
            np.stack([0.85 * r * np.cos(a) + off, 0.85 * r * np.sin(a)], 1),
        ]
    raise ValueError(kind)


def surface(kind, rng, h, w):
    hue_rgb = {
        "triangle": (rng.uniform(150, 255), rng.uniform(0, 90), rng.uniform(60, 160)),
        "cross": (rng.uniform(0, 80), rng.uniform(120, 220), rng.uniform(120, 255)),
        "hexagon": (rng.uniform(90, 190), rng.uniform(90, 190), rng.uniform(0, 60)),
        "crescent": (rng.uniform(200, 255), rng.uniform(200, 255), rng.uniform(180, 255)),
    }[kind]
    base = np.array(hue_rgb, dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "triangle":
        f = 0.75 + 0.25 * np.sign(np.sin(yy / rng.uniform(2.0, 3.5)))
    elif kind == "cross":
        f = 1.0 + rng.normal(0, 0.12, size=(h, w))
    elif kind == "hexagon":
        p = rng.uniform(5, 8)
        f = 0.7 + 0.3 * ((np.mod(xx, p) < p / 2) ^ (np.mod(yy, p) < p / 2))
    else:
        f = 0.6 + 0.4 * (xx / w)
    return np.clip(base * f[..., None], 0, 255)


def render(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(140, 300)), int(rng.integers(140, 300))
    img = blob_background(rng, h, w)
    lab = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.integers(1, len(CLASSES)))
        r = rng.uniform(0.12, 0.28) * min(h, w)
        th = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        m = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(m)
        for i, poly in enumerate(outline(CLASSES[c], rng, r)):
            d.polygon([tuple(p) for p in (poly @ rot.T + [cx, cy])], fill=0 if i else 255)
        sel = np.asarray(m) > 127
        img[sel] = surface(CLASSES[c], rng, h, w)[sel]
        lab[sel] = c
    border = np.zeros_like(lab, dtype=bool)
    for dy in (-2, -1, 0, 1, 2):
        for dx in (-2, -1, 0, 1, 2):
            border |= np.roll(np.roll(lab, dy, 0), dx, 1) != lab
    lab[border] = 255
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return im, lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    root = Path(a.out)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": range(a.train), "val": range(a.train, a.train + a.val)}
    for split, idx in splits.items():
        names = []
        for i in idx:
            name = f"h{i:05d}"
            im, lab = render(a.seed * 100_000 + i)
            im.save(root / "JPEGImages" / f"{name}.jpg", quality=90)
            p = Image.fromarray(lab, mode="P")
            p.putpalette(PALETTE.reshape(-1).tolist())
            p.save(root / "SegmentationClass" / f"{name}.png")
            names.append(name)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    print(f"wrote {a.train} train + {a.val} val images to {root}")


if __name__ == "__main__":
    main()
