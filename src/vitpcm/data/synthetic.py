"""Built-in synthetic dataset: textured shapes on textured backgrounds, in the VOC layout.

Each foreground class has its own shape family, colour range and surface texture; images
hold 1-3 objects that may overlap (later ones occlude earlier ones), on backgrounds made
of a colour gradient, multi-scale noise and unlabelled clutter strokes. Image sizes vary
and are rarely square. Masks mark a thin band on every object border as 255 (ignore), as
PASCAL VOC does, and image tags are derived from the masks, as the authors do.

Output layout (what :class:`vitpcm.data.voc.VOCDataset` reads)::

    OUT/JPEGImages/NAME.jpg
    OUT/SegmentationClass/NAME.png        palette PNG, 0 = background, 255 = ignore
    OUT/ImageSets/Segmentation/{train,val}.txt
    OUT/classes.txt                       background first
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from vitpcm.atomic import atomic_path, write_text_atomic
from vitpcm.classes import IGNORE_INDEX
from vitpcm.errors import VitpcmError
from vitpcm.io import save_mask_png
from vitpcm.utils.pools import process_pool
from vitpcm.utils.system import resolve_workers

CLASSES = ("background", "sun", "leaf", "brick", "star", "ring")
SIZE_RANGE = (112, 208)  # image sides are drawn independently from this range
BORDER = 1  # ignore band: pixels within this distance of a label change become 255


@dataclass(frozen=True)
class _Style:
    hue: float  # centre of the class hue range (0..1)
    shape: str
    texture: str


_STYLES: Dict[str, _Style] = {
    "sun": _Style(hue=0.12, shape="disc", texture="radial"),
    "leaf": _Style(hue=0.31, shape="lens", texture="veins"),
    "brick": _Style(hue=0.02, shape="box", texture="bricks"),
    "star": _Style(hue=0.61, shape="star", texture="speckle"),
    "ring": _Style(hue=0.82, shape="ring", texture="checker"),
}


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(img), -1.5, 1.5)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient between two muted colours + multi-scale noise + unlabelled clutter strokes."""
    hue = rng.uniform()
    c0 = _hsv(hue, rng.uniform(0.05, 0.45), rng.uniform(0.3, 0.9))
    c1 = _hsv(hue + rng.uniform(-0.25, 0.25), rng.uniform(0.05, 0.45), rng.uniform(0.3, 0.9))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    noise = sum(amp * _smooth_noise(rng, h, w, cells) for amp, cells in ((0.08, 3), (0.05, 9), (0.03, 27)))
    img = img + noise[..., None] * rng.uniform(0.5, 1.5, size=3).astype(np.float32)

    canvas = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
        colour = tuple(int(c * 255) for c in _hsv(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.2, 0.95)))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if rng.uniform() < 0.6:
            x1, y1 = x0 + rng.normal(0, w / 3), y0 + rng.normal(0, h / 3)
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(2, min(h, w) / 12)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    return np.asarray(canvas).astype(np.float32) / 255.0


def _polygon(kind: str, rng: np.random.Generator, size: float) -> List[np.ndarray]:
    """Outline(s) of one object centred at 0 in local coordinates; a ring returns (outer, inner)."""
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    if kind == "disc":
        a = size * rng.uniform(0.85, 1.15)
        b = size * rng.uniform(0.85, 1.15)
        return [np.stack([a * np.cos(t), b * np.sin(t)], 1)]
    if kind == "lens":  # a pointed leaf: |y| <= b (1 - (x / a)^2)
        a, b = size * rng.uniform(1.1, 1.5), size * rng.uniform(0.35, 0.55)
        x = np.linspace(-a, a, 40)
        y = b * (1 - (x / a) ** 2)
        return [np.concatenate([np.stack([x, y], 1), np.stack([x[::-1], -y[::-1]], 1)])]
    if kind == "box":
        a, b = size * rng.uniform(0.8, 1.3), size * rng.uniform(0.45, 0.8)
        return [np.array([[-a, -b], [a, -b], [a, b], [-a, b]], dtype=np.float64)]
    if kind == "star":
        n = 5
        ang = np.linspace(0, 2 * math.pi, 2 * n, endpoint=False) - math.pi / 2
        rad = np.where(np.arange(2 * n) % 2 == 0, size * 1.2, size * rng.uniform(0.45, 0.6))
        return [np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)]
    if kind == "ring":
        outer = size * rng.uniform(0.95, 1.15)
        inner = outer * rng.uniform(0.45, 0.6)
        return [
            np.stack([outer * np.cos(t), outer * np.sin(t)], 1),
            np.stack([inner * np.cos(t), inner * np.sin(t)], 1),
        ]
    raise ValueError(kind)


def _shape_mask(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    size = rng.uniform(0.13, 0.3) * min(h, w)
    polys = _polygon(kind, rng, size)
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    margin = 0.4 * size
    cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for i, poly in enumerate(polys):
        pts = poly @ rot.T + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=255 if i == 0 else 0)
    return np.asarray(canvas) > 127


def _texture(style: _Style, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An ``[H, W, 3]`` surface in [0, 1] for one object of this style, covering the image."""
    base = _hsv(style.hue + rng.uniform(-0.035, 0.035), rng.uniform(0.6, 0.95), rng.uniform(0.65, 1.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    u = math.cos(theta) * xx + math.sin(theta) * yy
    v = -math.sin(theta) * xx + math.cos(theta) * yy
    period = rng.uniform(5, 9)
    if style.texture == "radial":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / (0.5 * min(h, w))
        shade = 1.15 - 0.45 * np.clip(r, 0, 1)
        return base * shade[..., None]
    if style.texture == "veins":
        shade = 0.8 + 0.2 * np.cos(2 * math.pi * v / period) ** 8
        return base * shade[..., None] * 0.9
    if style.texture == "bricks":
        row = np.floor(v / period)
        shift = (row % 2) * period
        mortar = (np.mod(v, period) < 1.3) | (np.mod(u + shift, 2 * period) < 1.3)
        out = np.broadcast_to(base, (h, w, 3)).copy()
        out[mortar] = out[mortar] * 0.45 + 0.45
        return out
    if style.texture == "speckle":
        speck = rng.uniform(0, 1, size=(h, w)) < 0.12
        out = np.broadcast_to(base, (h, w, 3)).copy()
        out[speck] = np.clip(out[speck] * 1.6 + 0.2, 0, 1)
        return out
    if style.texture == "checker":
        cell = period * 0.8
        check = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        return base * (0.7 + 0.3 * check)[..., None]
    raise ValueError(style.texture)


def _void_border(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a change of label, as a boolean map."""
    border = np.zeros(label.shape, dtype=bool)
    padded = np.pad(label, width, mode="edge")
    h, w = label.shape
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dy == 0 and dx == 0:
                continue
            shifted = padded[width + dy : width + dy + h, width + dx : width + dx + w]
            border |= shifted != label
    return border


def render_sample(seed: int, classes: Sequence[str] = CLASSES) -> Tuple[np.ndarray, np.ndarray]:
    """Render one image and its mask, deterministically from ``seed``.

    Returns ``(image [H, W, 3] uint8, mask [H, W] uint8)`` with 0 = background,
    class i = ``classes[i]`` and 255 on object borders.
    """
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    image = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    n_objects = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    for _ in range(n_objects):
        cls = int(rng.integers(1, len(classes)))
        style = _STYLES[classes[cls]]
        shape = _shape_mask(style.shape, rng, h, w)
        if shape.sum() < 30:
            continue
        image[shape] = _texture(style, rng, h, w)[shape]
        label[shape] = cls
    # Soft camera: slight blur and sensor noise, so edges and flat areas are not perfectly clean.
    img8 = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    img8 = img8.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    arr = np.asarray(img8).astype(np.float32) + rng.normal(0, 3.0, size=(h, w, 3))
    mask = label.copy()
    mask[_void_border(label, BORDER)] = IGNORE_INDEX
    return np.clip(arr, 0, 255).astype(np.uint8), mask


def _write_one(args: Tuple[Path, str, int]) -> str:
    root, name, seed = args
    image, mask = render_sample(seed)
    with atomic_path(root / "JPEGImages" / f"{name}.jpg") as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=92)
    save_mask_png(root / "SegmentationClass" / f"{name}.png", mask)
    return name


def generate(
    out: Path | str,
    n_train: int = 300,
    n_val: int = 100,
    seed: int = 0,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the synthetic dataset to ``out`` in the VOC layout and return ``out``.

    ``seed`` fixes every image; train and val never share a seed. ``workers`` processes
    render in parallel (0 = one per CPU). An existing non-empty folder is refused unless
    ``overwrite`` is set.
    """
    root = Path(out)
    if n_train < 1 or n_val < 0:
        raise VitpcmError(f"need --train >= 1 and --val >= 0, got {n_train} and {n_val}")
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise VitpcmError(f"{root} exists and is not empty: choose another --out or pass --overwrite")
    splits = {
        "train": [(f"train_{i:05d}", seed * 1_000_003 + i) for i in range(n_train)],
        "val": [(f"val_{i:05d}", seed * 1_000_003 + 500_000 + i) for i in range(n_val)],
    }
    jobs = [(root, name, s) for items in splits.values() for name, s in items]
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    n_workers = resolve_workers(workers)
    bar = tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress)
    if n_workers > 1 and len(jobs) > 16:
        with process_pool(n_workers) as pool:  # the workers die with this process (kill -9 too)
            for _ in pool.map(_write_one, jobs, chunksize=8):
                bar.update()
    else:
        for job in jobs:
            _write_one(job)
            bar.update()
    bar.close()
    # Lists last: a folder whose lists exist is complete.
    write_text_atomic(root / "classes.txt", "\n".join(CLASSES) + "\n")
    for split, items in splits.items():
        write_text_atomic(root / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{n}\n" for n, _ in items))
    write_text_atomic(
        root / "synth.json",
        json.dumps({"generator": "vitpcm.data.synthetic", "train": n_train, "val": n_val, "seed": seed}) + "\n",
    )
    return root
