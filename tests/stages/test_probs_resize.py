"""``infer.probs_resize=skimage``: the stored probabilities (the CRF's input) enlarged as the
authors' CRF branch enlarges them (scikit-image's ``resize(order=1)``); the mask unchanged."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from vitpcm.models.predict import upsample, upsample_skimage
from vitpcm.stages.infer import run_inference


@pytest.mark.parametrize("grid, size", [((7, 5), (13, 11)), ((24, 24), (375, 500)), ((1, 3), (4, 9))])
def test_upsample_skimage_is_half_pixel_bilinear_with_mirrored_edges(grid, size):
    # scikit-image's resize(order=1, mode="reflect") enlarging = SciPy's zoom(order=1, mode="mirror", grid_mode=True)
    probs = np.random.default_rng(0).random((3, *grid))
    ref = np.stack([ndimage.zoom(c, (size[0] / grid[0], size[1] / grid[1]), order=1, mode="mirror", grid_mode=True)
                    for c in probs])  # fmt: skip
    ours = upsample_skimage(torch.from_numpy(probs), size).numpy()
    assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-12
    # and it is not the mask's resize: the edges differ
    plain = upsample(torch.from_numpy(probs), size, align_corners=False).numpy()
    assert np.abs(plain - ours).max() > 1e-3


def test_infer_stores_the_authors_crf_input_and_keeps_the_mask(tmp_path, tiny_run):
    runs = {}
    for mode in ("mask", "skimage"):
        run = tmp_path / mode
        shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("pseudo"))
        run_inference(run, "val", overrides=[f"infer.probs_resize={mode}"], progress=False)
        runs[mode] = run / "pseudo" / "val"
    names = sorted(p.stem for p in (runs["mask"] / "masks").glob("*.png"))
    assert names
    moved = 0.0
    for name in names:
        a, b = (np.load(runs[m] / "probs" / f"{name}.npz") for m in ("mask", "skimage"))
        assert np.array_equal(a["classes"], b["classes"]) and a["probs"].shape == b["probs"].shape
        moved = max(moved, float(np.abs(a["probs"] - b["probs"]).max()))
        masks = [np.array(Image.open(runs[m] / "masks" / f"{name}.png")) for m in ("mask", "skimage")]
        assert np.array_equal(*masks)
    assert moved > 1e-3
