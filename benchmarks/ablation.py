"""Ablation of the CPU preset: MCE only / + ET / + HV-BiLSTM / + REG (and HV-BiLSTM without ET).

Trains each variant of ``configs/synthetic.yaml`` on one or more VOC-layout datasets,
writes pseudo-masks for their val split with ``best.pt`` and tabulates the BPM mIoU::

    python benchmarks/ablation.py                         # built-in synthetic + holdout set
    python benchmarks/ablation.py --data /path/to/voc-layout --out docs/ablation.md

Without ``--data`` it makes two sets under ``--work``: the demo's synthetic set (300 train,
100 val, seed 0) and the independent holdout set of ``benchmarks/holdout_shapes.py``.
Raw results go to ``benchmarks/results/ablation.jsonl``; the table to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = [
    ("MCE only", ["loss.et=false", "loss.reg=false", "model.hv_lstm=false"]),
    ("+ ET", ["loss.et=true", "loss.reg=false", "model.hv_lstm=false"]),
    ("+ HV-BiLSTM", ["loss.et=true", "loss.reg=false", "model.hv_lstm=true"]),
    ("+ REG (full preset)", []),
    ("MCE + HV-BiLSTM, no ET", ["loss.et=false", "loss.reg=false", "model.hv_lstm=true"]),
]


def run_variant(data: Path, label: str, overrides: list[str], work: Path) -> dict:
    from vitpcm.config import load_config
    from vitpcm.engine.infer import run_inference
    from vitpcm.engine.train import train

    slug = label.lower().replace(" ", "_").replace("+", "p").replace(",", "").replace("(", "").replace(")", "")
    run = work / "runs" / f"{data.name}-{slug}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    cfg = load_config("synthetic", [f"data.root={data}", *overrides])
    t0 = time.time()
    result = train(cfg, run, progress=False)
    seconds = time.time() - t0
    summary = run_inference(run, "val", progress=False)
    iou = {k: v for k, v in summary["iou"].items() if v is not None}
    return {
        "dataset": str(data),
        "variant": label,
        "overrides": overrides,
        "bpm_miou": summary["miou"],
        "min_class_iou": min(iou.values()),
        "worst_class": min(iou, key=iou.get),
        "best_val_miou": result["best_miou"],
        "final_val_miou": result["history"][-1]["val_miou"],
        "train_seconds": round(seconds, 1),
        "iou": summary["iou"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", type=Path, help="VOC-layout folder(s); default: synthetic + holdout")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vitpcm-ablation"), help="scratch folder for data and runs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "ablation.md")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "ablation.jsonl")
    args = ap.parse_args()

    datasets = args.data
    if not datasets:
        from vitpcm.data.synthetic import generate

        synth, holdout = args.work / "synthetic", args.work / "holdout"
        if not (synth / "ImageSets/Segmentation/val.txt").is_file():
            generate(synth, 300, 100, seed=0, overwrite=True, progress=False)
        if not (holdout / "ImageSets/Segmentation/val.txt").is_file():
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "holdout_shapes.py"), str(holdout)], check=True)
        datasets = [synth, holdout]

    rows = []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for data in datasets:
        for label, overrides in VARIANTS:
            row = run_variant(data, label, overrides, args.work)
            rows.append(row)
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{data.name:>12}  {label:<24} BPM mIoU {100 * row['bpm_miou']:6.2f}"
                  f"  worst {row['worst_class']} {100 * row['min_class_iou']:.1f}  ({row['train_seconds']:.0f}s)", flush=True)  # fmt: skip

    names = [d.name for d in datasets]
    lines = [
        "# Ablation of the CPU preset",
        "",
        "BPM mIoU (%) on each set's val split: `configs/synthetic.yaml` trained from scratch on the",
        "train split, pseudo-masks from `best.pt` (best val mIoU, as the authors select), tags merged.",
        "In brackets: the worst class's IoU. Each variant changes only the keys shown.",
        "",
        "| variant | overrides | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, overrides in VARIANTS:
        cells = []
        for data in datasets:
            r = next(r for r in rows if r["variant"] == label and r["dataset"] == str(data))
            cells.append(f"{100 * r['bpm_miou']:.1f} ({100 * r['min_class_iou']:.0f})")
        shown = " ".join(f"`{o}`" for o in overrides) or "—"
        lines.append(f"| {label} | {shown} | " + " | ".join(cells) + " |")
    cmd = "python benchmarks/ablation.py" + "".join(f" --data {shlex.quote(str(d))}" for d in (args.data or []))
    lines += [
        "",
        f"Regenerate: `{cmd}` (2-core CPU: about {sum(r['train_seconds'] for r in rows) / 60:.0f} min of training).",
        "Raw rows, per-class IoU included: `benchmarks/results/ablation.jsonl`.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
