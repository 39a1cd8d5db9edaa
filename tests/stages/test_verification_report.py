"""`vitpcm report RUN --segment SEGRUN`: the verification section (BPM vs CRF vs DeepLab).

Both runs are faked (no training, no model): the ViT-PCM run is a config, a class list
and BPM / CRF masks; the DeepLab run is PNG masks where `vitpcm segment infer` writes them
(SEGRUN/pseudo/SPLIT/masks and .../crf), both from the ground truth with some noise.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.stages.test_report import _png_ok, check_self_contained

from vitpcm.atomic import write_text_atomic
from vitpcm.classes import class_list
from vitpcm.cli import main
from vitpcm.config import load_config, to_yaml
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import confused_pairs
from vitpcm.io import names_in, read_mask_png, read_names, save_mask_png
from vitpcm.runs import PseudoLayout, RunLayout
from vitpcm.stages.report import _best_images, report


def _fake_run(synth_root: Path, tmp_path: Path) -> Path:
    """A run folder as `vitpcm train` + `vitpcm infer --crf` leave it, minus checkpoints and
    probabilities: BPM = ground truth with its lower half lost to background, CRF = ground truth."""
    layout = RunLayout(tmp_path / "run")
    write_text_atomic(layout.config, to_yaml(load_config("synthetic", [f"data.root={synth_root}"])))
    shutil.copy(synth_root / "classes.txt", layout.classes)
    pseudo = PseudoLayout(layout.pseudo("val"))
    for name in read_names(synth_root / "ImageSets/Segmentation/val.txt"):
        clean = _clean(synth_root / "SegmentationClass" / f"{name}.png")
        bpm = clean.copy()
        bpm[bpm.shape[0] // 2 :] = 0  # the lower half lost
        save_mask_png(pseudo.masks / f"{name}.png", bpm)
        save_mask_png(pseudo.crf / f"{name}.png", clean)
    return layout.root


def _clean(path: Path) -> np.ndarray:
    gt = read_mask_png(path)
    return np.where(gt == 255, 0, gt).astype(np.uint8)


def _fake_segment_run(seg: Path, gt_dir: Path, names, crf: bool = True) -> None:
    """DeepLab masks: image i of n loses the fraction i / 2n of its object pixels to
    background (image 0 perfect); the CRF masks are the ground truth (255 -> background)."""
    pseudo = PseudoLayout(RunLayout(seg).pseudo("val"))
    for i, name in enumerate(sorted(names)):
        clean = _clean(gt_dir / f"{name}.png")
        noisy = clean.copy()
        ys, xs = np.nonzero(clean)
        k = len(ys) * i // (2 * len(names))
        noisy[ys[:k], xs[:k]] = 0
        save_mask_png(pseudo.masks / f"{name}.png", noisy)
        if crf:
            save_mask_png(pseudo.crf / f"{name}.png", clean)


def test_report_with_a_deeplab_run(synth_root, tmp_path, capsys):
    run = _fake_run(synth_root, tmp_path)
    # the voc12 list (the synthetic masks use its first indices): the Table S1 row and the whole table
    write_text_atomic(RunLayout(run).classes, "\n".join(class_list("voc12")) + "\n")
    names = names_in(run / "pseudo/val/masks", ".png")
    seg = tmp_path / "seg"
    _fake_segment_run(seg, synth_root / "SegmentationClass", names)

    assert main(["report", str(run), "--segment", str(seg), "--samples", "2", "-q"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"val verification: bpm mIoU [\d.]+  crf mIoU [\d.]+  deeplab mIoU [\d.]+  deeplab\+crf mIoU 100\.00",
                     printed)  # fmt: skip
    report = run / "report.html"
    refs = check_self_contained(report)
    text = report.read_text()
    for needle in ("Verification: DeepLab, split val", "Per-class IoU: BPM, CRF, DeepLab", "<td>deeplab</td>",
                   "<td>deeplab+crf</td>", "published: voc12-deeplabv2-val", "The paper's whole table",
                   "<td>ours: deeplab+crf</td>", "<td>MCT-Former</td>", "image | ground truth | bpm | crf | deeplab | deeplab+crf",
                   'href="#verification-val"', "Best 6 of 6 images by per-image mIoU of the deeplab+crf masks"):  # fmt: skip
        assert needle in text, needle
    assert "../seg/pseudo/val/masks/" in refs.links and "../seg/pseudo/val/crf/" in refs.links
    # images: split section (bars, 2 confusions, 2 S2 rows, the worst images, an example per confused
    # pair) + verification (bars, 2 S2 rows, S3 grid)
    pairs = confused_pairs(np.load(run / "eval/val/confusion_bpm.npy"), 5)
    assert len(refs.imgs) == 1 + 2 + 2 + 1 + len(pairs) + 1 + 2 + 1
    ver = RunLayout(run).verification("val")
    metrics = json.loads((ver / "metrics.json").read_text())
    assert list(metrics["results"]) == ["bpm", "crf", "deeplab", "deeplab+crf"]
    assert metrics["results"]["deeplab+crf"]["miou"] == 1.0 and metrics["results"]["deeplab"]["miou"] < 1.0
    assert metrics["published"]["id"] == "voc12-deeplabv2-val" and metrics["published"]["iou"]["cat"] == 90.2
    # each image's own mIoU, DeepLab + CRF first (its masks are the ground truth here: 100 each)
    per_image = (ver / "per_image.csv").read_text().splitlines()
    assert per_image[0] == "name,deeplab+crf_miou,deeplab_miou" and len(per_image) == 1 + len(names)
    assert all(row.split(",")[1] == "100.00" for row in per_image[1:])
    assert "eval/val/verification/per_image.csv" in refs.links
    # BPM / CRF reused from the split section: the same numbers as eval/val
    split_metrics = json.loads((RunLayout(run).eval("val") / "metrics.json").read_text())
    assert metrics["results"]["bpm"] == split_metrics["results"]["bpm"]
    assert (ver / "confusion_deeplab_crf.npy").is_file() and (ver / "iou_bars.png").is_file()
    figures = RunLayout(run).figures / "val"
    _png_ok(figures / "verification_best.png")
    assert len(list(figures.glob("*_verification.png"))) == 2


def test_best_images_and_missing_pieces(synth_root, tmp_path):
    run = _fake_run(synth_root, tmp_path)
    names = sorted(names_in(run / "pseudo/val/masks", ".png"))
    seg = tmp_path / "seg"
    _fake_segment_run(seg, synth_root / "SegmentationClass", names, crf=False)  # DeepLab without CRF
    shutil.rmtree(run / "pseudo/val/crf")  # the ViT-PCM run without CRF masks
    result = report(run, segment=seg, samples=1, progress=False)
    ver = result["verification"]["val"]
    assert list(ver["results"]) == ["bpm", "deeplab"] and ver["published"] is None  # synthetic classes: no paper row
    text = (run / "report.html").read_text()
    # no CRF: the DeepLab masks themselves rank the images; image 0 is untouched, then less noise first
    caption = re.search(r'image \| mask, per-image mIoU: ([^<"]*)["<]', text).group(1)
    picked = [(c.rsplit(" ", 1)[0], float(c.rsplit(" ", 1)[1])) for c in caption.split(", ")]
    assert picked[0] == (names[0], 100.0) and len(picked) == len(names)
    assert [m for _, m in picked] == sorted((m for _, m in picked), reverse=True) and picked[-1][1] < 100
    check_self_contained(run / "report.html")

    scores = {"a": {"miou": 1.0, "gt_classes": [0]}, "b": {"miou": 0.9, "gt_classes": [0, 2]},
              "c": {"miou": 0.95, "gt_classes": [0, 1]}, "d": {"miou": float("nan"), "gt_classes": []}}  # fmt: skip
    assert _best_images(scores, 2) == [("c", 0.95), ("b", 0.9)]  # all-background "a" is trivially perfect

    shutil.rmtree(run / "pseudo/val")  # no BPM masks: DeepLab alone, and a note saying how to add them
    report(run, segment=seg, samples=0, progress=False)
    text = (run / "report.html").read_text()
    assert "no BPM masks of split val in this run" in text and "Verification: DeepLab, split val" in text


def test_segment_errors(synth_root, tmp_path, capsys):
    run = _fake_run(synth_root, tmp_path)
    assert main(["report", str(run), "--segment", str(tmp_path / "nope"), "-q"]) == 2
    assert "folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitpcmError, match="no DeepLab masks in .*vitpcm segment infer"):
        report(run, segment=tmp_path / "empty", progress=False)
    seg = tmp_path / "seg"
    save_mask_png(seg / "pseudo/test/masks/x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(VitpcmError, match="no DeepLab masks of split val"):
        report(run, splits=["val"], segment=seg, progress=False)
    write_text_atomic(seg / "classes.txt", "a\nb\n")
    with pytest.raises(VitpcmError, match="classes.txt differs"):
        report(run, segment=seg, progress=False)
