"""`vitpcm predict` on a demo's val images without tags (issue 20): the masks' mIoU with the
tags the model predicts against the same masks with the true tags, and images/s.

    python benchmarks/predict_bench.py DEMO [--json benchmarks/results/predict_demo.json]

DEMO is a `vitpcm demo` folder (its run/, data/). Three `predict` runs over the val images,
the same code path each time, so only the tags differ:

* ``true tags``: each image's tags from its ground-truth mask (``--tags-file``), i.e. what
  ``vitpcm infer`` merges in (its BPM mIoU is printed beside, for reference);
* ``predicted, default threshold``: the run's recorded best threshold (chosen on this same
  val split by ``vitpcm infer``: an optimistic, in-sample choice);
* ``predicted, threshold 0.5``: a fixed threshold, chosen on nothing.

images/s is the model loop of the first run (decode, forward, merge, upsample, writes;
screening and model loading excluded), on whatever machine runs this, as it is loaded.
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

from vitpcm.classes import read_classes  # noqa: E402
from vitpcm.evaluation import evaluate_folders  # noqa: E402
from vitpcm.evaluation.tags import tag_quality  # noqa: E402
from vitpcm.io import labels_from_mask, read_mask_png, read_names  # noqa: E402
from vitpcm.stages.bench.machine import machine_info  # noqa: E402
from vitpcm.stages.predict import predict_images  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", help="a `vitpcm demo` folder")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "predict_demo.json"))
    args = parser.parse_args()
    demo = Path(args.demo)
    run, data = demo / "run", demo / "data"
    classes = read_classes(run / "classes.txt")
    names = read_names(data / "ImageSets" / "Segmentation" / "val.txt")
    files = [data / "JPEGImages" / f"{n}.jpg" for n in names]
    gt = data / "SegmentationClass"
    truth = {n: labels_from_mask(read_mask_png(gt / f"{n}.png"), len(classes)) for n in names}
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        tags_csv = Path(tmp) / "true_tags.csv"
        tags_csv.write_text("".join(f"{n}.jpg,{';'.join(classes[c] for c in np.flatnonzero(t) if c)}\n"
                                    for n, t in truth.items()))  # fmt: skip
        runs = {
            "predicted, default threshold": {},
            "predicted, threshold 0.5": {"threshold": 0.5},
            "true tags": {"tags_file": tags_csv},
        }
        results = {}
        for label, kwargs in runs.items():
            out = Path(tmp) / label.replace(" ", "_").replace(",", "")
            t0 = time.time()
            s = predict_images(run, files, out=out, overwrite=True, progress=False, **kwargs)
            wall = time.time() - t0
            cm = evaluate_folders({label: out / "masks"}, gt, classes, names=names, progress=False)[label]
            records = s["records"]
            scores = np.array([[r["scores"][c] for c in classes] for r in records])
            known = np.stack([truth[r["name"]] for r in records])
            q = tag_quality(scores, known, classes, float(s["threshold"]))
            exact = sum(set(r["tags"]) == {classes[c] for c in np.flatnonzero(truth[r["name"]]) if c} for r in records)
            results[label] = {
                "miou": round(100 * cm.miou(), 2),
                "threshold": s["threshold"],
                "threshold_from": s["threshold_from"],
                "images": s["images"],
                "model_seconds": s["seconds"],
                "images_per_second": s["images_per_second"],
                "wall_seconds": round(wall, 2),
                "tags_exact": f"{exact}/{len(records)}",
                "tag_mean_f1": round(100 * q["mean_f1"], 2),
                "tag_map": round(100 * q["map"], 2) if q["map"] is not None else None,
            }
            print(f"{label}: mIoU {results[label]['miou']:.2f}  threshold {s['threshold']:g}  tags exact {exact}/"
                  f"{len(records)}  {s['images_per_second']} images/s")  # fmt: skip

    infer_summary = json.loads((run / "pseudo" / "val" / "summary.json").read_text())
    result = {
        "what": "vitpcm predict on the demo's val images: masks from predicted vs true tags",
        "demo": str(demo),
        "scale": infer_summary.get("scale"),
        "infer_bpm_miou": round(100 * infer_summary["miou"], 2) if "miou" in infer_summary else None,
        "runs": results,
        "machine": machine_info("cpu"),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "note": "machine shared with other jobs while measured; images/s is a lower bound for an idle CPU",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
