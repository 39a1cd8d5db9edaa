"""An image with its mask laid over it in the class colours, and a legend below: what
``vitpcm predict --overlay`` writes (``overlays/NAME.jpg``). Pillow and numpy only (no
matplotlib: one overlay per image must cost little beside the model).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vitpcm.atomic import atomic_path
from vitpcm.classes import pascal_palette

ALPHA = 0.5  # the mask's weight over the image (background pixels are left as they are)


def _legend_font(width: int):
    """A font that stays legible beside the image: ~1/50 of its width, at least 11 px
    (Pillow < 10.1 has only its fixed ~11 px bitmap font)."""
    size = max(11, width // 50)
    try:
        return ImageFont.load_default(size=size), size
    except TypeError:
        return ImageFont.load_default(), 11


def blend(image: np.ndarray, mask: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """``image`` ``[H, W, 3]`` uint8 and ``mask`` ``[H, W]`` class indices -> ``[H, W, 3]``
    uint8: each non-background pixel mixed with its class colour (PASCAL palette)."""
    colours = pascal_palette()[mask].astype(np.float32)
    out = image.astype(np.float32)
    fg = (mask > 0) & (mask != 255)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str]) -> Image.Image:
    """:func:`blend` with a legend strip below: a swatch, the class name and its share of
    the pixels for every class in the mask (largest first). Returns an RGB image
    ``W x (H + legend)``."""
    h, w = mask.shape
    counts = np.bincount(mask.ravel(), minlength=256)
    shown = [int(c) for c in np.argsort(-counts) if counts[c] > 0 and c != 255]
    palette = pascal_palette()
    font, size = _legend_font(w)
    row = size + 5  # legend row height
    # lay the entries out in rows that fit the image width
    entries = [f"{class_names[c] if c < len(class_names) else c} {100 * counts[c] / mask.size:.0f}%" for c in shown]
    widths = [row + 4 + int(font.getlength(e)) + 10 for e in entries]
    rows, x = 1, 0
    for wd in widths:
        if x and x + wd > w:
            rows, x = rows + 1, 0
        x += wd
    canvas = Image.new("RGB", (w, h + rows * row + 4), (255, 255, 255))
    canvas.paste(Image.fromarray(blend(image, mask)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = 2, h + 2
    for c, text, wd in zip(shown, entries, widths):
        if x > 2 and x + wd > w:
            x, y = 2, y + row
        draw.rectangle([x, y + 2, x + row - 4, y + row - 2], fill=tuple(int(v) for v in palette[c]), outline=(0, 0, 0))
        draw.text((x + row, y + 2), text, fill=(0, 0, 0), font=font)
        x += wd
    return canvas


def thumbnail_jpeg(path: str | Path, max_side: int = 320, quality: int = 80) -> bytes:
    """A JPEG file scaled down to at most ``max_side`` pixels a side, as bytes (the report
    inlines overlays this small, so a folder of camera photos does not bloat the page)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def save_overlay(path: str | Path, image: np.ndarray, mask: np.ndarray, class_names: Sequence[str]) -> None:
    """Write :func:`overlay_with_legend` as a JPEG (quality 90), atomically."""
    picture = overlay_with_legend(image, mask, class_names)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        picture.save(f, format="JPEG", quality=90)
