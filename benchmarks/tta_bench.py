"""What test-time augmentation adds: BPM and BPM + CRF mIoU with and without ``--tta``.

Usage (on a trained run, e.g. the demo's)::

    PYTHONPATH=src python benchmarks/tta_bench.py RUN [--split val] [--out benchmarks/results/tta_bench.json]

Runs ``vitpcm infer RUN --split SPLIT --crf`` four times into a temporary folder: plain,
flips only (``infer.tta_scales=[1.0]``), scales only (``infer.tta_flip=false``) and full TTA
(the defaults: scales 0.75 / 1 / 1.25 of ``infer.scale`` and horizontal flips), and
records the BPM mIoU, the CRF mIoU and the seconds of each. The seconds come from a shared
2-core machine and are noisy; the mIoU values are deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vitpcm.stages.infer import run_inference  # noqa: E402

VARIANTS = {
    "plain": (False, []),
    "flip": (True, ["infer.tta_scales=[1.0]"]),
    "scales": (True, ["infer.tta_flip=false"]),
    "tta": (True, []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tta_bench.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ttabench-"))
    results = {"run": str(Path(args.run).resolve()), "split": args.split, "date": time.strftime("%Y-%m-%d %H:%M"),
               "loadavg_before": round(os.getloadavg()[0], 2), "variants": {}}  # fmt: skip
    try:
        for name, (tta, overrides) in VARIANTS.items():
            start = time.perf_counter()
            s = run_inference(args.run, args.split, out=work / name, tta=tta, crf=True, overrides=overrides,
                              progress=False)  # fmt: skip
            results["variants"][name] = {
                "tta": s["tta"],
                "bpm_miou": s.get("miou"),
                "crf_miou": s.get("crf_miou"),
                "infer_seconds": s["seconds"],
                "crf_seconds": s["crf"]["seconds"],
                "total_seconds": round(time.perf_counter() - start, 2),
            }
            print(name, json.dumps(results["variants"][name]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain = results["variants"]["plain"]
    results["gain_points"] = {
        k: {"bpm": 100 * (v["bpm_miou"] - plain["bpm_miou"]), "crf": 100 * (v["crf_miou"] - plain["crf_miou"])}
        for k, v in results["variants"].items() if k != "plain"
    }  # fmt: skip
    results["loadavg_after"] = round(os.getloadavg()[0], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["gain_points"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
