"""How many mean-field iterations the CRF needs to give the masks of the authors' 10.

Usage::

    PYTHONPATH=src python benchmarks/crf_iterations.py [--n 20] [--out benchmarks/results/crf_iterations.json]

On the CRF bench's VOC-sized inputs (:func:`vitpcm.stages.bench.crf.make_crf_inputs`, seed 0),
pydensecrf2 with the authors' kernels (``crf.gaussian=lattice``) over the present classes,
run for k = 1..10 iterations: the share of pixels whose label equals the 10-iteration label,
and what stopping at the first k whose labels equal those of k - 1 would give (issue 19,
item 6: a candidate to measure; nothing in vitpcm stops early).
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
from vitpcm.stages.bench.crf import make_crf_inputs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="VOC-sized images (default 20)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crf_iterations.json"))
    args = parser.parse_args()
    equal = np.zeros(11)
    worst = np.ones(11)
    stop_equal, stop_iters, total = 0, [], 0
    seconds = np.zeros(11)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        names = make_crf_inputs(Path(tmp), args.n, seed=0)
        for name in names:
            probs, _ = load_probs(Path(tmp) / "probs" / f"{name}.npz")
            image = load_rgb(Path(tmp) / "images" / f"{name}.jpg")
            labels = {}
            for k in range(1, 11):
                start = time.process_time()
                labels[k] = dense_crf(image, probs, CRFParams(iterations=k, gaussian="lattice",
                                                              backend="pydensecrf")).argmax(0)  # fmt: skip
                seconds[k] += time.process_time() - start
            for k in range(1, 11):
                equal[k] += int((labels[k] == labels[10]).sum())
                worst[k] = min(worst[k], float((labels[k] == labels[10]).mean()))
            stop = next((k for k in range(2, 11) if np.array_equal(labels[k], labels[k - 1])), 10)
            stop_iters.append(stop)
            stop_equal += int((labels[stop] == labels[10]).sum())
            total += labels[10].size
    result = {
        "images": args.n,
        "crf": "pydensecrf2, crf.gaussian=lattice (the authors' kernels), present classes",
        "pixels_equal_to_10_iterations_pct": {k: round(100.0 * equal[k] / total, 4) for k in range(1, 11)},
        "worst_image_equal_pct": {k: round(100.0 * worst[k], 4) for k in range(1, 11)},
        "cpu_seconds_per_image": {k: round(seconds[k] / args.n, 3) for k in range(1, 11)},
        "stop_when_labels_stable": {
            "pixels_equal_pct": round(100.0 * stop_equal / total, 4),
            "iterations_mean": float(np.mean(stop_iters)),
            "iterations": stop_iters,
        },
        "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "stop_when_labels_stable"}, indent=1))
    print("stop when stable:", {k: v for k, v in result["stop_when_labels_stable"].items() if k != "iterations"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
