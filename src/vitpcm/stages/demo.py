"""``vitpcm demo``: the whole chain on the built-in synthetic set, on a CPU.

synthetic data -> ViT-PCM training -> pseudo-masks + CRF (val and train) -> DeepLab trained
on the train split's CRF masks (``vitpcm segment train``, the ``synthetic_segment`` preset:
a ResNet-18 DeepLabV2 from scratch) -> DeepLab's val masks + CRF (``vitpcm segment infer``)
-> evaluation -> report. Everything lands in one folder (default ``./vitpcm-demo``)::

    data/                  the synthetic VOC-layout dataset
    run/                   the ViT-PCM training run (config, checkpoints, logs)
    run/pseudo/val/        masks/ (BPM), probs/ and crf/ (BPM + dense CRF) of the val split
    run/pseudo/train/      the same for the train split: crf/ is what DeepLab trains on
    run/eval/val/          BPM vs CRF: per_class.csv/.md, metrics.json, confusion matrices
    run/figures/           training curves, sample figures
    run/report.html        the report (open it in a browser; works offline)
    segment/               the DeepLab run (config, checkpoints, logs) and its
                           pseudo/val/{masks,probs,crf}
    summary.json           bpm_miou, crf_miou, segment_miou, per-class IoU, timings

The same ``key=value`` overrides go to both presets (``synthetic`` and
``synthetic_segment``): ``train.*`` / ``model.*`` reach ViT-PCM, ``segment.*`` DeepLab.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Sequence

from vitpcm.atomic import write_json_atomic, write_text_atomic
from vitpcm.classes import read_classes
from vitpcm.config import load_config
from vitpcm.data.synthetic import generate
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import format_comparison
from vitpcm.runs import PseudoLayout, RunLayout
from vitpcm.stages.infer import infer
from vitpcm.stages.report import report as write_report
from vitpcm.stages.segment import DEMO_PRESET, segment_infer, segment_train
from vitpcm.stages.train import train

log = logging.getLogger(__name__)
MARKER = ".vitpcm-demo"


def _prepare_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise VitpcmError(f"{out} exists and was not made by `vitpcm demo`: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / MARKER, "made by vitpcm demo; the next demo run here replaces this folder\n")


def demo(
    out: str | Path = "vitpcm-demo",
    *,
    n_train: int = 300,
    n_val: int = 100,
    seed: int = 0,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> Dict[str, Any]:
    """Run the whole pipeline on the built-in synthetic set into ``out``.

    Returns the summary (also written to ``OUT/summary.json``): ``bpm_miou``, ``crf_miou``,
    ``segment_miou`` (DeepLab + CRF, the paper's verification protocol; without the CRF:
    ``segment_miou_no_crf``), per-class IoU, timings and paths; ``table`` (not in the file)
    is BPM vs CRF vs DeepLab per class as text, for the CLI to print.
    """
    out = Path(out)
    _prepare_folder(out)
    timings: Dict[str, float] = {}

    t = time.time()
    data = generate(out / "data", n_train=n_train, n_val=n_val, seed=seed, progress=progress)
    timings["synth"] = time.time() - t
    log.info("synthetic data: %d train + %d val images in %s (%.1fs)", n_train, n_val, data, timings["synth"])

    cfg = load_config("synthetic", [f"data.root={data.resolve()}", *overrides])  # absolute: the report reads it later
    run = RunLayout(out / "run")
    t = time.time()
    result = train(cfg, run.root, progress=progress)
    timings["train"] = time.time() - t

    # pseudo-masks of the val split, then the dense CRF over them (one chain: `vitpcm infer --crf`)
    inference = infer(run.root, "val", crf=True, progress=progress)
    timings["infer"] = float(inference["seconds"])
    timings["crf"] = float(inference["crf"]["seconds"])
    log.info(
        "dense CRF: %d images in %.1fs (%d workers)", inference["images"], timings["crf"], inference["crf"]["workers"]
    )

    # verification: pseudo-masks (+ CRF) of the train split, a DeepLab trained on them,
    # its val masks (+ CRF) against the ground truth
    train_pseudo = infer(run.root, "train", crf=True, progress=progress)
    timings["infer_train"] = float(train_pseudo["seconds"])
    timings["crf_train"] = float(train_pseudo["crf"]["seconds"])
    seg_cfg = load_config(DEMO_PRESET, [f"data.root={data.resolve()}", *overrides])
    segment = RunLayout(out / "segment")
    t = time.time()
    seg_result = segment_train(seg_cfg, segment.root, PseudoLayout(run.pseudo("train")).crf, progress=progress)
    timings["segment_train"] = time.time() - t
    seg_infer = segment_infer(segment.root, "val", crf=True, progress=progress)
    timings["segment_infer"] = float(seg_infer["seconds"])
    timings["segment_crf"] = float(seg_infer["crf"]["seconds"])

    # evaluation (BPM vs CRF vs DeepLab in one table), figures and report.html
    t = time.time()
    result_report = write_report(run.root, splits=["val"], segment=segment.root, progress=False)
    timings["evaluate_and_report"] = time.time() - t
    evaluation = result_report["evaluations"]["val"]
    classes = read_classes(data / "classes.txt")
    bpm, crf_summary = evaluation["results"]["bpm"], evaluation["results"]["crf"]
    pseudo = PseudoLayout(run.pseudo("val"))
    verification = result_report["verification"]["val"]["results"]
    deeplab, deeplab_crf = verification["deeplab"], verification["deeplab+crf"]

    summary = {
        "bpm_miou": bpm["miou"],
        "crf_miou": crf_summary["miou"],
        "iou": bpm["iou"],
        "crf_iou": crf_summary["iou"],
        "segment_miou": deeplab_crf["miou"],
        "segment_miou_no_crf": deeplab["miou"],
        "segment_iou": deeplab_crf["iou"],
        "pixel_acc": {"bpm": bpm["pixel_acc"], "crf": crf_summary["pixel_acc"], "segment": deeplab_crf["pixel_acc"]},
        "best_val_miou_during_training": result["best_miou"],
        "segment_training": {
            "images": seg_result["images"],
            "missing": seg_result["missing"],
            "epochs": seg_result["epochs"],
            "iterations": seg_result["iterations"],
            "model": seg_infer["model"],
        },
        "train_images": n_train,
        "val_images": n_val,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(sum(timings.values()), 1),
        "paths": {
            "data": str(data),
            "run": str(run.root),
            "masks": str(pseudo.masks),
            "probs": str(pseudo.probs),
            "crf": str(pseudo.crf),
            "eval": str(run.eval("val")),
            "segment": str(segment.root),
            "segment_crf": str(PseudoLayout(segment.pseudo("val")).crf),
            "report": result_report["report"],
            "summary": str(out / "summary.json"),
        },
        "inference_scale": inference["scale"],
    }
    write_json_atomic(out / "summary.json", summary)
    shown = {"BPM": bpm, "BPM + CRF": crf_summary, "DeepLab": deeplab, "DeepLab + CRF": deeplab_crf}
    return dict(summary, table=format_comparison(shown, classes))
