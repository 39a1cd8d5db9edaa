"""Probe (issue 19, item 6): the bilateral message of the dense CRF on a 2x coarser grid.

Usage::

    PYTHONPATH=src python benchmarks/crf_coarse_probe.py [N]   # after crf_speed.py agreement (inputs, authors' masks)
    # -> benchmarks/results/crf_speed_coarse_bilateral.json

Each mean-field step: Q box-downsampled 2x, pydensecrf's bilateral lattice (sxy scaled by
the same factor) on the image box-downsampled 2x, its message bilinear-upsampled to full
size; the smoothness kernel exact at full size; 10 steps. Pixels equal to the authors'
masks (``/tmp/crfspeed/authors``, made by ``benchmarks/crf_speed.py agreement``).
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
from PIL import Image
from pydensecrf import eigen
from scipy.ndimage import gaussian_filter1d

from vitpcm.images import load_rgb
from vitpcm.io import read_mask_png
from vitpcm.postprocess.crf import _softmax, unary_energy
from vitpcm.postprocess.probs_file import read_probs


def resize(planes, size, how):
    return np.stack(
        [
            np.asarray(Image.fromarray(np.ascontiguousarray(p, np.float32), mode="F").resize(size[::-1], how))
            for p in planes
        ]
    )


def coarse_crf(image, probs, factor, iterations=10):
    c, h, w = probs.shape
    n = h * w
    h2, w2 = (h + factor - 1) // factor, (w + factor - 1) // factor
    small = np.require(np.asarray(Image.fromarray(image).resize((w2, h2), Image.BOX)), np.uint8, ["C", "W"])
    crf = dcrf.DenseCRF2D(w2, h2, c)
    crf.addPairwiseBilateral(sxy=67.0 * w2 / w, srgb=3, rgbim=small, compat=4)
    unary = unary_energy(probs)

    def sm(x):
        return gaussian_filter1d(gaussian_filter1d(x, 1.0, axis=-2, mode="constant"), 1.0, axis=-1, mode="constant")

    norm = (1 / np.sqrt(sm(np.ones((h, w), np.float32)) + np.float32(1e-20))).astype(np.float32)
    e, m = eigen.matrixXf(np.zeros((c, h2 * w2), np.float32)), eigen.matrixXf(np.zeros((c, h2 * w2), np.float32))
    q = _softmax(-unary)
    for _ in range(iterations):
        qs = resize(q.reshape(c, h, w), (h2, w2), Image.BOX).reshape(c, -1)
        crf.stepInference(eigen.matrixXf(np.ascontiguousarray(qs)), e, m)
        msg = resize(np.asarray(m).reshape(c, h2, w2), (h, w), Image.BILINEAR).reshape(c, n)
        g = (norm * sm(q.reshape(c, h, w) * norm)).reshape(c, n)
        q = _softmax(3.0 * g - unary - msg)
    return q


d = Path("/tmp/crfspeed/voc")
names = sorted(p.stem for p in (d / "probs").glob("*.npz"))[: int(sys.argv[1]) if len(sys.argv) > 1 else 20]
for factor in (2,):
    same = total = 0
    worst = 1
    cpu = 0
    for nme in names:
        probs, classes, _ = read_probs(d / "probs" / f"{nme}.npz")
        image = load_rgb(d / "images" / f"{nme}.jpg")
        t = time.process_time()
        q = coarse_crf(image, probs, factor)
        cpu += time.process_time() - t
        mask = classes[q.argmax(0)].reshape(probs.shape[1:])
        theirs = read_mask_png(Path("/tmp/crfspeed/authors") / f"{nme}.png")
        eq = (mask == theirs).sum()
        same += eq
        total += mask.size
        worst = min(worst, eq / mask.size)
    result = {
        "what": "bilateral message on a 2x coarser grid, exact smoothness, 10 steps, present classes",
        "command": "python benchmarks/crf_coarse_probe.py " + " ".join(sys.argv[1:]),
        "images": len(names),
        "factor": factor,
        "pixels_equal_to_authors_pct": round(100 * same / total, 4),
        "worst_image_pct": round(100 * worst, 4),
        "cpu_seconds_per_image": round(cpu / len(names), 4),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(result)
    Path(__file__).resolve().parent.joinpath("results", "crf_speed_coarse_bilateral.json").write_text(
        json.dumps(result, indent=1) + "\n"
    )
