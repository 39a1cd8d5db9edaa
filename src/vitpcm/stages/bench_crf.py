"""Dense-CRF benchmark material: test inputs, the authors' all-channel CRF path, agreement.

Shared by ``vitpcm bench`` (:mod:`vitpcm.stages.bench`), ``benchmarks/crf_bench.py`` and
``benchmarks/coco_crf_bench.py``, so the reference path exists once.

* :func:`make_crf_inputs`: N images with ``probs/NAME.npz`` as ``vitpcm infer`` writes them
  (present classes only, at the image size), VOC-sized (500 x 375, every other one
  portrait) or any other size and class count (COCO: 640 x 480, 81 classes).
* :func:`authors_one` / :func:`run_authors`: the authors' CRF stage (their ``crf.py`` and
  ``main.py test --crf``): the probabilities scattered into *all* channels (absent classes
  0), pydensecrf's ``unary_from_softmax``, ``DenseCRF2D(W, H, C)``, argmax, PNG; spread
  over ``jobs`` processes by ``joblib.Parallel(n_jobs=jobs, pre_dispatch="all")`` as their
  ``main.py`` does (``n_jobs=CONFIG.DATALOADER.NUM_WORKERS``, 24 in their configs: every
  core of their machine), or one image after another in one process (``jobs=1``).
* :func:`agreement`: share of pixels where two mask folders agree.

``python -m vitpcm.stages.bench_crf authors PROBS IMAGES OUT NUM_CLASSES [JOBS]`` runs the
authors' path in a fresh process (JOBS default 1; joblib is needed for more: ``pip install
joblib``, in the ``[bench]`` extra) (so a benchmark can include process start, as for
``vitpcm crf``). This module imports neither torch nor timm at import time; only
:func:`make_crf_inputs` uses torch (pooling and bilinear upsampling), inside the call.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from vitpcm.crf_params import CRFParams
from vitpcm.io import find_image, names_in, read_mask_png, save_mask_png, save_npz_atomic

VOC_CLASSES = 21
COCO_CLASSES = 81
GRID = 60  # patch grid of ViT-PCM at 960 with 16 px patches
VOC_SIZES = ((500, 375), (375, 500))  # (W, H), alternating: VOC's common landscape / portrait
COCO_SIZES = ((640, 480),)


def make_crf_inputs(
    folder: Path,
    n: int,
    seed: int = 0,
    num_classes: int = VOC_CLASSES,
    sizes: Sequence[Tuple[int, int]] = VOC_SIZES,
    grid: int = GRID,
) -> List[str]:
    """Write ``folder/images/NAME.jpg`` and ``folder/probs/NAME.npz`` for ``n`` images.

    The images are the built-in synthetic shapes (``render_sample``: 1-3 objects) upscaled
    to ``sizes[i % len(sizes)]`` (W, H), saved as JPEG (quality 90) with mild sensor-like
    noise. The probabilities imitate baseline pseudo-masks: the one-hot mask pooled to a
    ``grid x grid`` patch grid, noisy logits, softmax over background + the 1-3 present
    classes (random ids in 1..num_classes-1), bilinear upsampling to the image size;
    ``probs`` [P, H, W] float32 and ``classes`` [P] int64 as ``vitpcm infer`` writes them.
    Returns the names.
    """
    import torch
    import torch.nn.functional as F

    from vitpcm.data.synthetic import render_sample

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "probs").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        image, mask = render_sample(seed * 1000 + i)
        img = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC)).astype(np.float32)
        img = np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)  # sensor-like noise
        name = f"img_{i:03d}"
        Image.fromarray(img).save(folder / "images" / f"{name}.jpg", quality=90)
        label = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST)).copy()
        label[label == 255] = 0
        synthetic = [int(c) for c in np.unique(label) if c != 0]
        ids = rng.choice(np.arange(1, num_classes), size=len(synthetic), replace=False)
        classes = np.array([0, *sorted(int(v) for v in ids)], dtype=np.int64)
        index = {0: 0, **{c: 1 + sorted(ids.tolist()).index(int(v)) for c, v in zip(synthetic, ids)}}
        local = np.vectorize(index.get)(label)  # [H, W] in 0..P-1
        onehot = torch.from_numpy(np.eye(len(classes), dtype=np.float32)[local]).permute(2, 0, 1)[None]
        pooled = F.adaptive_avg_pool2d(onehot, (grid, grid))
        logits = 4.0 * pooled + torch.from_numpy(rng.normal(0, 0.8, pooled.shape).astype(np.float32))
        probs = F.interpolate(logits.softmax(1), size=(h, w), mode="bilinear", align_corners=False)[0]
        save_npz_atomic(folder / "probs" / f"{name}.npz", probs=probs.numpy().astype(np.float32), classes=classes)
        names.append(name)
    return names


def authors_one(
    probs_path: Path, image_path: Path, out_path: Path, num_classes: int, params: Optional[CRFParams] = None
) -> float:
    """The authors' CRF of one image: all ``num_classes`` channels, ``unary_from_softmax``;
    writes the mask PNG and returns the CPU seconds it took."""
    import pydensecrf.densecrf as dcrf
    import pydensecrf.utils as utils

    params = params or CRFParams()
    start = time.process_time()
    data = np.load(probs_path)
    probs, classes = data["probs"], data["classes"]
    full = np.zeros((num_classes, *probs.shape[1:]), dtype=np.float32)  # their dict2preds: absent = 0
    full[classes] = probs
    image = np.array(Image.open(image_path).convert("RGB"))
    c, h, w = full.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(full)))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)  # fmt: skip
    q = np.array(crf.inference(params.iterations)).reshape(c, h, w)
    save_mask_png(out_path, q.argmax(0).astype(np.uint8))
    return time.process_time() - start


def run_authors(
    probs_dir: Path, images_dir: Path, out_dir: Path, names: Sequence[str], num_classes: int, jobs: int = 1
) -> Dict[str, float]:
    """The authors' path over ``names``: wall and CPU seconds (total, per image; CPU seconds
    summed over the workers). ``jobs`` > 1: their ``joblib.Parallel`` over that many
    processes (joblib's default backend, loky, as in their ``main.py``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(probs_dir / f"{n}.npz", find_image(images_dir, n), out_dir / f"{n}.png", num_classes) for n in names]
    start = time.perf_counter()
    if jobs > 1:
        try:
            import joblib
        except ImportError:
            raise SystemExit("the authors' parallel CRF needs joblib: pip install joblib (or vitpcm[bench])") from None
        cpu = sum(joblib.Parallel(n_jobs=jobs, pre_dispatch="all")(joblib.delayed(authors_one)(*t) for t in tasks))
    else:
        cpu = sum(authors_one(*t) for t in tasks)
    wall = time.perf_counter() - start
    return {"seconds": wall, "seconds_per_image": wall / len(names), "cpu_seconds_per_image": cpu / len(names)}


def agreement(dir_a: Path, dir_b: Path, names: Sequence[str]) -> Dict[str, float]:
    """Pixels where the masks ``dir_a/NAME.png`` and ``dir_b/NAME.png`` agree."""
    same = total = 0
    per_image = []
    for n in names:
        a, b = read_mask_png(dir_a / f"{n}.png"), read_mask_png(dir_b / f"{n}.png")
        eq = int((a == b).sum())
        same, total = same + eq, total + a.size
        per_image.append(eq / a.size)
    return {"pixels_equal_pct": 100.0 * same / total, "worst_image_pct": 100.0 * min(per_image),
            "images_identical": int(sum(p == 1.0 for p in per_image)), "images": len(names)}  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``authors PROBS IMAGES OUT NUM_CLASSES [JOBS]``: the authors' path over every NAME.npz."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (5, 6) or args[0] != "authors":
        print("usage: python -m vitpcm.stages.bench_crf authors PROBS IMAGES OUT NUM_CLASSES [JOBS]", file=sys.stderr)
        return 2
    probs, images, out = Path(args[1]), Path(args[2]), Path(args[3])
    jobs = int(args[5]) if len(args) == 6 else 1
    result = run_authors(probs, images, out, names_in(probs, ".npz"), int(args[4]), jobs)
    print(f"{result['seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
