"""Train variants of the CPU preset and record their val mIoU per epoch (how the preset was chosen).

Each variant is ``NAME DATA key=value ...``; results append to a JSON-lines file::

    python benchmarks/preset_sweep.py --out benchmarks/results/preset_sweep.jsonl \\
        "h_crop10 /tmp/holdout train.schedule=cosine augment.crop=1.0" \\
        "h_crop06 /tmp/holdout train.schedule=cosine augment.crop=0.6 train.seed=1"

Val mIoU is the training loop's own (at ``input.train_size``, tags merged), so it is cheaper
than the BPM of ``benchmarks/ablation.py`` (at ``infer.scale``) and a little lower.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help='"NAME DATA key=value ..." (one quoted string per variant)')
    ap.add_argument("--out", type=Path, required=True, help="JSON-lines file the results are appended to")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vitpcm-sweep"), help="scratch folder for the runs")
    args = ap.parse_args()

    from vitpcm.config import load_config
    from vitpcm.stages.train import train

    for spec in args.variants:
        name, data, *overrides = shlex.split(spec)
        cfg = load_config("synthetic", [f"data.root={data}", *overrides])
        t0 = time.time()
        result = train(cfg, args.work / name, progress=False)
        curve = [h["val_miou"] for h in result["history"]]
        row = {"name": name, "data": data, "overrides": overrides, "best": max(curve), "final": curve[-1],
               "secs": round(time.time() - t0), "curve": [round(x, 3) for x in curve]}  # fmt: skip
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: best {100 * row['best']:.1f}  final {100 * row['final']:.1f}  ({row['secs']} s)", flush=True)


if __name__ == "__main__":
    main()
