"""``vitpcm demo``: synthetic data -> training -> pseudo-masks -> evaluation, on a CPU.

Everything lands in one folder (default ``./vitpcm-demo``)::

    data/                  the synthetic VOC-layout dataset
    run/                   the training run (config, checkpoints, logs)
    run/pseudo/val/        masks/ and probs/ of the val split
    summary.json           bpm_miou, per-class IoU, timings
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from vitpcm.config import load_config
from vitpcm.data.synthetic import generate
from vitpcm.engine.infer import run_inference
from vitpcm.engine.train import train
from vitpcm.errors import VitpcmError
from vitpcm.io import read_classes, write_json_atomic, write_text_atomic
from vitpcm.metrics import evaluate_folder, format_table

log = logging.getLogger(__name__)
MARKER = ".vitpcm-demo"


def _prepare_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise VitpcmError(f"{out} exists and was not made by `vitpcm demo`: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / MARKER, "made by vitpcm demo; the next demo run here replaces this folder\n")


def run_demo(
    out: str | Path = "vitpcm-demo",
    n_train: int = 300,
    n_val: int = 100,
    seed: int = 0,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> Dict[str, Any]:
    """Run the whole pipeline on the built-in synthetic set; returns the summary dict."""
    out = Path(out)
    _prepare_folder(out)
    timings: Dict[str, float] = {}

    t = time.time()
    data = generate(out / "data", n_train=n_train, n_val=n_val, seed=seed, progress=progress)
    timings["synth"] = time.time() - t
    log.info("synthetic data: %d train + %d val images in %s (%.1fs)", n_train, n_val, data, timings["synth"])

    cfg = load_config("synthetic", [f"data.root={data}", *overrides])
    t = time.time()
    result = train(cfg, out / "run", progress=progress)
    timings["train"] = time.time() - t

    t = time.time()
    inference = run_inference(out / "run", "val", progress=progress)
    timings["infer"] = time.time() - t

    t = time.time()
    classes = read_classes(data / "classes.txt")
    cm = evaluate_folder(out / "run" / "pseudo" / "val" / "masks", data / "SegmentationClass", classes,
                         names=_split_names(data, "val"), progress=False)  # fmt: skip
    timings["evaluate"] = time.time() - t
    summary = cm.summary(classes)
    table = format_table(summary, classes, title="BPM IoU")
    print(table)

    report = {
        "bpm_miou": summary["miou"],
        "iou": summary["iou"],
        "best_val_miou_during_training": result["best_miou"],
        "train_images": n_train,
        "val_images": n_val,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(sum(timings.values()), 1),
        "paths": {
            "data": str(data),
            "run": str(out / "run"),
            "masks": str(out / "run" / "pseudo" / "val" / "masks"),
            "probs": str(out / "run" / "pseudo" / "val" / "probs"),
        },
        "inference_scale": inference["scale"],
    }
    write_json_atomic(out / "summary.json", report)
    print(f"BPM mIoU on the synthetic val set: {100 * summary['miou']:.2f}  ({report['total_seconds']:.0f}s in all)")
    print(f"summary: {out / 'summary.json'}")
    return report


def _split_names(root: Path, split: str) -> list[str]:
    from vitpcm.io import read_names

    return read_names(root / "ImageSets" / "Segmentation" / f"{split}.txt")
