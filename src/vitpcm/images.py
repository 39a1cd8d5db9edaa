"""Reading images as they are found in the wild: every format becomes ``[H, W, 3]`` uint8 RGB.

What is converted silently (and noted, so ``vitpcm check-data`` can count it):

* greyscale, bilevel, palette, CMYK and YCbCr images -> RGB;
* images with transparency (RGBA, LA, palette + transparency) -> composited on white,
  which is how viewers show them on a page (the hidden colour under alpha 0 is often junk);
* 16-bit images (``I;16`` greyscale, 16-bit RGB PNG) -> 8 bit by scaling the full range
  (v * 255 / 65535), never by clipping;
* PNG (or any other format) bytes behind a ``.jpg`` name: Pillow reads the content, not
  the name;
* EXIF orientation: the image is returned as displayed, and masks are expected to be
  aligned with that view.

What is an error: a missing, unreadable or truncated file. The whole image is decoded
(``Image.load``), so a truncated JPEG fails here rather than training on a grey half.

JPEG pixels depend on the decoder's inverse DCT. Pillow uses libjpeg's accurate integer
IDCT; TensorFlow's ``tf.image.decode_jpeg``, which the authors read every image with, uses
its fast integer IDCT by default and ignores EXIF orientation: 31-50 % of the pixels of a
photo differ, by up to about 16 grey levels. ``jpeg_decoder="tf"`` (``data.jpeg_decoder``,
docs/reproduce.md, switch 12) decodes JPEGs as TensorFlow does, through libjpeg-turbo's fast
IDCT (simplejpeg).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from vitpcm.errors import VitpcmError

_FORMAT_SUFFIXES = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),
}
_ORIENTATION_TAG = 0x0112
#: ``data.jpeg_decoder`` values: Pillow's accurate IDCT, EXIF applied | TensorFlow's decode_jpeg
JPEG_DECODERS = ("pillow", "tf")


class ImageReadError(Exception):
    """The file cannot be decoded; ``truncated`` tells a cut-off file from other damage."""

    def __init__(self, message: str, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


def decode_image(path: Path, jpeg_decoder: str = "pillow") -> Tuple[np.ndarray, List[str]]:
    """Fully decode an image file.

    Returns ``[H, W, 3]`` uint8 RGB as displayed (EXIF orientation applied) and a list of
    short notes on what was converted (``"greyscale"``, ``"16-bit"``, ``"PNG data behind
    .jpg name"``, ...; empty for a plain RGB file). Raises :class:`ImageReadError`.

    ``jpeg_decoder="tf"``: a greyscale or colour JPEG is decoded as TensorFlow's
    ``decode_jpeg(channels=3)`` decodes it (fast IDCT, EXIF orientation not applied; module
    docstring); other files and CMYK JPEGs as with ``"pillow"``.
    """
    notes: List[str] = []
    try:
        with Image.open(path) as img:
            fmt = img.format or "?"
            suffix = Path(path).suffix.lower()
            if fmt in _FORMAT_SUFFIXES and suffix not in _FORMAT_SUFFIXES[fmt]:
                notes.append(f"{fmt} data behind {suffix or 'no'} suffix")
            if jpeg_decoder == "tf" and fmt == "JPEG" and img.mode in ("L", "RGB"):
                if img.mode == "L":
                    notes.append("greyscale")
                if img.getexif().get(_ORIENTATION_TAG, 1) in (2, 3, 4, 5, 6, 7, 8):
                    notes.append("EXIF orientation ignored (data.jpeg_decoder=tf)")
                return decode_jpeg_like_tf(Path(path).read_bytes()), notes
            img.load()  # decode everything now: truncation surfaces here, not in training
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
            if orientation in (2, 3, 4, 5, 6, 7, 8):  # other values mean nothing; exif_transpose ignores them
                notes.append("EXIF orientation")
                img = ImageOps.exif_transpose(img)
            arr = _to_rgb(img, notes)
    except FileNotFoundError:
        raise ImageReadError(f"{path} not found") from None
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        text = str(exc)
        raise ImageReadError(text or type(exc).__name__, truncated="truncated" in text.lower()) from None
    return arr, notes


def decode_jpeg_like_tf(data: bytes) -> np.ndarray:
    """JPEG bytes -> ``[H, W, 3]`` uint8 as ``tf.image.decode_jpeg(data, channels=3)`` with its
    default ``dct_method`` (libjpeg-turbo's fast integer IDCT, fancy upsampling). Raises
    ValueError on damaged data (simplejpeg's strict mode: a truncated file too)."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False, strict=True)


def _to_rgb(img: Image.Image, notes: List[str]) -> np.ndarray:
    """Any Pillow mode -> ``[H, W, 3]`` uint8 (see the module docstring for the rules)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        notes.append("16-bit" if mode.startswith("I;16") or mode == "I" else "float")
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            top = 1.0 if arr.max() <= 1.0 else (255.0 if arr.max() <= 255.0 else float(arr.max()))
        else:
            # 16-bit range; a 32-bit "I" image that exceeds it is scaled by its own maximum
            top = 65535.0 if arr.max() <= 65535 else float(arr.max())
        grey = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        notes.append("transparency")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode != "RGB":
        notes.append({"L": "greyscale", "1": "greyscale", "P": "palette", "CMYK": "CMYK"}.get(mode, mode))
    return np.array(img.convert("RGB"))


def load_rgb(path: Path) -> np.ndarray:
    """Read an image as ``[H, W, 3]`` uint8 RGB as displayed; :class:`VitpcmError` if it cannot be read."""
    try:
        return decode_image(Path(path))[0]
    except ImageReadError as exc:
        raise VitpcmError(f"cannot read image {path}: {exc}") from None
