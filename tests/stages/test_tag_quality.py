"""Tag quality recorded by `vitpcm infer` and used as `vitpcm predict`'s default threshold (issue 20)."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from vitpcm.evaluation.tags import tag_quality
from vitpcm.io import labels_from_mask, read_mask_png
from vitpcm.runs import RunLayout
from vitpcm.stages.infer import infer
from vitpcm.stages.predict import predict_images

VAL = [f"val_{i:05d}" for i in range(6)]


def test_infer_records_tag_quality_and_predict_takes_its_threshold(run, synth_root, tmp_path):
    summary = infer(run, "val", progress=False)
    record_path = RunLayout(run).tag_quality("val")
    record = json.loads(record_path.read_text())
    # the same numbers from the stored pooled scores and the ground-truth tags
    pseudo = RunLayout(run).pseudo("val")
    scores = np.stack([np.load(pseudo / "probs" / f"{n}.npz")["pooled"] for n in VAL])
    truth = np.stack([labels_from_mask(read_mask_png(synth_root / "SegmentationClass" / f"{n}.png"), 6) for n in VAL])
    expected = tag_quality(scores, truth, (run / "classes.txt").read_text().split(), 0.5)
    for key in ("images", "mean_f1", "map", "best_threshold", "best_mean_f1", "per_class"):
        assert record[key] == expected[key], key
    assert record["images"] == 6 and summary["tags"]["best_threshold"] == record["best_threshold"]

    # a resumed infer still measures every image (the scores come back from the npz files)
    record_path.unlink()
    assert infer(run, "val", progress=False)["resumed"] == 6
    assert json.loads(record_path.read_text())["per_class"] == record["per_class"]

    image = synth_root / "JPEGImages" / "val_00000.jpg"
    s = predict_images(run, [image], out=tmp_path / "o", progress=False)
    assert s["threshold"] == record["best_threshold"] and "best mean F1 on val" in s["threshold_from"]

    later = time.time() + 10  # a retrained checkpoint: the record no longer speaks for it
    os.utime(run / "checkpoints" / "best.pt", (later, later))
    s = predict_images(run, [image], out=tmp_path / "o", progress=False)
    assert (s["threshold"], s["threshold_from"]) == (0.5, "infer.present_threshold")
