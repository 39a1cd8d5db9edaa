"""The torch backend of the dense CRF against pydensecrf2: pixel agreement and marginals.

Usage::

    PYTHONPATH=src python benchmarks/crf_torch_agreement.py [--voc 50] [--coco 20]
        [--out benchmarks/results/crf_torch_agreement.json]

On the CRF bench's inputs (:func:`vitpcm.stages.bench.crf.make_crf_inputs`, seed 0: ``--voc``
VOC-sized 500 x 375 / 375 x 500 images with 21 classes, ``--coco`` COCO-like 640 x 480 with
81), each image's present-class probabilities go through ``dense_crf`` with
``crf.backend=pydensecrf`` and with ``crf.backend=torch`` (on the CPU), under
``crf.gaussian=lattice`` (the authors') and ``exact``. Reported per set and mode: the share
of pixels whose label is the same, the worst image, the images identical, the largest
difference of the marginals, and the seconds per image of each backend in this process
(torch with ``--threads`` threads, 1 by default, as pydensecrf's one core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vitpcm.crf_params import CRFParams  # noqa: E402
from vitpcm.images import load_rgb  # noqa: E402
from vitpcm.postprocess.crf import dense_crf  # noqa: E402
from vitpcm.postprocess.probs_file import load_probs  # noqa: E402
from vitpcm.stages.bench.crf import COCO_CLASSES, COCO_SIZES, VOC_CLASSES, VOC_SIZES, make_crf_inputs  # noqa: E402


def compare(folder: Path, names: list, gaussian: str) -> dict:
    same = total = 0
    per_image, max_diff = [], 0.0
    seconds = {"pydensecrf": 0.0, "torch": 0.0}
    for name in names:
        probs, _ = load_probs(folder / "probs" / f"{name}.npz")
        image = load_rgb(folder / "images" / f"{name}.jpg")
        q = {}
        for backend in ("pydensecrf", "torch"):
            start = time.perf_counter()
            q[backend] = dense_crf(image, probs, CRFParams(gaussian=gaussian, backend=backend))
            seconds[backend] += time.perf_counter() - start
        eq = int((q["pydensecrf"].argmax(0) == q["torch"].argmax(0)).sum())
        same, total = same + eq, total + probs[0].size
        per_image.append(eq / probs[0].size)
        max_diff = max(max_diff, float(np.abs(q["pydensecrf"] - q["torch"]).max()))
    return {
        "images": len(names),
        "pixels_equal_pct": 100.0 * same / total,
        "worst_image_pct": 100.0 * min(per_image),
        "images_identical": int(sum(p == 1.0 for p in per_image)),
        "marginals_max_abs_diff": max_diff,
        "seconds_per_image": {k: v / len(names) for k, v in seconds.items()},
        "per_image_pct": [round(100.0 * p, 4) for p in per_image],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc", type=int, default=50, help="VOC-sized images (default 50)")
    parser.add_argument("--coco", type=int, default=20, help="COCO-like images (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crf_torch_agreement.json"))
    args = parser.parse_args()

    import torch

    from vitpcm.stages.bench.machine import machine_info

    torch.set_num_threads(args.threads)
    result: dict = {"machine": machine_info(), "torch_threads": args.threads, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"voc": (args.voc, VOC_CLASSES, VOC_SIZES), "coco": (args.coco, COCO_CLASSES, COCO_SIZES)}
        for label, (n, classes, sizes) in sets.items():
            if n <= 0:
                continue
            folder = Path(tmp) / label
            names = make_crf_inputs(folder, n, seed=0, num_classes=classes, sizes=sizes)
            for gaussian in ("lattice", "exact"):
                res = compare(folder, names, gaussian)
                result[f"{label}_{gaussian}"] = res
                print(f"{label} {gaussian}: {res['pixels_equal_pct']:.4f} % equal, worst {res['worst_image_pct']:.4f} %,"
                      f" marginals max diff {res['marginals_max_abs_diff']:.2e}, s/img {res['seconds_per_image']}",
                      flush=True)  # fmt: skip
    result["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
