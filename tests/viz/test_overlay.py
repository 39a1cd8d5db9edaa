"""predict's overlays: the image blended with the class colours, a legend below."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image

from vitpcm.classes import pascal_palette
from vitpcm.viz.overlay import ALPHA, blend, overlay_with_legend, save_overlay, thumbnail_jpeg

NAMES = ["background", "cat", "dog"]


def _case(h: int, w: int):
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : w // 2] = 1
    mask[h // 2 :, w // 2 :] = 2
    return image, mask


def test_blend_colours_the_objects_and_leaves_the_background():
    image, mask = _case(20, 30)
    out = blend(image, mask)
    bg = mask == 0
    assert np.array_equal(out[bg], image[bg])
    expected = np.rint((1 - ALPHA) * image[mask == 1] + ALPHA * pascal_palette()[1].astype(np.float64))
    assert np.abs(out[mask == 1].astype(int) - expected.astype(int)).max() <= 1


def test_legend_below_the_image_shows_each_class_colour_and_scales_with_the_image(tmp_path):
    image, mask = _case(40, 60)
    picture = np.asarray(overlay_with_legend(image, mask, NAMES))
    assert picture.shape[1] == 60 and picture.shape[0] > 40
    assert np.array_equal(picture[:40], blend(image, mask))  # the image part is untouched by the legend
    legend = picture[40:].reshape(-1, 3)
    for c in (1, 2):  # a swatch of each class colour
        assert (legend == pascal_palette()[c]).all(1).any(), c
    legend_height = {w: overlay_with_legend(*_case(100, w), NAMES).size[1] - 100 for w in (600, 2000)}
    assert legend_height[2000] > 1.5 * legend_height[600]  # one row each: a wide photo gets a larger font
    big_image, big_mask = _case(400, 2000)
    save_overlay(tmp_path / "sub" / "o.jpg", big_image, big_mask, NAMES)
    thumb = thumbnail_jpeg(tmp_path / "sub" / "o.jpg", max_side=200)

    with Image.open(BytesIO(thumb)) as im:
        assert im.format == "JPEG" and max(im.size) == 200
