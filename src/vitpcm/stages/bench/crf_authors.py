"""The authors' dense-CRF stage, as the baseline of the ``crf`` section; torch-free, so its
fresh process pays no torch start-up.

:func:`authors_one` / :func:`run_authors`: their ``crf.py`` and ``main.py test --crf``: the
probabilities scattered into *all* channels (absent classes 0), pydensecrf's
``unary_from_softmax``, ``DenseCRF2D(W, H, C)``, argmax, PNG; spread over ``jobs`` processes
by ``joblib.Parallel(n_jobs=jobs, pre_dispatch="all")`` as their ``main.py`` does
(``n_jobs=CONFIG.DATALOADER.NUM_WORKERS``, 24 in their configs: every core of their
machine), or one image after another in one process (``jobs=1``).

``python -m vitpcm.stages.bench.crf_authors authors PROBS IMAGES OUT NUM_CLASSES [JOBS]``
runs it in a fresh process (JOBS default 1; joblib is needed for more: ``pip install
joblib``, in the ``[bench]`` extra), so a benchmark can include process start, as for
``vitpcm crf``. Neither this module nor its package imports torch or timm.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.utils as utils
from PIL import Image

from vitpcm.crf_params import CRFParams
from vitpcm.io import find_image, names_in, save_mask_png

USAGE = "usage: python -m vitpcm.stages.bench.crf_authors authors PROBS IMAGES OUT NUM_CLASSES [JOBS]"


def authors_one(
    probs_path: Path, image_path: Path, out_path: Path, num_classes: int, params: Optional[CRFParams] = None
) -> float:
    """The authors' CRF of one image: all ``num_classes`` channels, ``unary_from_softmax``;
    writes the mask PNG and returns the CPU seconds it took."""
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``authors PROBS IMAGES OUT NUM_CLASSES [JOBS]``: the authors' path over every NAME.npz."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (5, 6) or args[0] != "authors":
        print(USAGE, file=sys.stderr)
        return 2
    probs, images, out = Path(args[1]), Path(args[2]), Path(args[3])
    jobs = int(args[5]) if len(args) == 6 else 1
    result = run_authors(probs, images, out, names_in(probs, ".npz"), int(args[4]), jobs)
    print(f"{result['seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
