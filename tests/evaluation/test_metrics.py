"""Evaluation: a hand-computed confusion matrix, several folders in one table, published rows."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitpcm.classes import class_list
from vitpcm.cli import main
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import ConfusionMatrix, evaluate_folders, format_comparison, load_published, published_row
from vitpcm.io import save_mask_png
from vitpcm.stages.evaluate import folder_labels

NAMES = ["bg", "a", "b", "c"]  # b: only predicted (false positive), c: nowhere
GT = np.array([[0, 0, 1, 1], [0, 255, 1, 1], [0, 0, 0, 1]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [2, 2, 1, 0], [0, 0, 0, 1]], dtype=np.uint8)
# by hand: the ignore pixel (predicted b) does not count
#            pred bg  a  b  c
EXPECTED = [[4, 1, 1, 0],  # gt bg
            [1, 4, 0, 0],  # gt a
            [0, 0, 0, 0],
            [0, 0, 0, 0]]  # fmt: skip


def test_confusion_matrix_by_hand_with_ignore_and_absent_classes():
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    assert cm.matrix.tolist() == EXPECTED
    s = cm.summary(NAMES)
    assert s["pixels"] == 11
    assert s["pixel_acc"] == pytest.approx(8 / 11)
    assert s["mean_acc"] == pytest.approx((4 / 6 + 4 / 5) / 2)
    assert s["iou"] == pytest.approx({"bg": 4 / 7, "a": 4 / 6, "b": 0.0, "c": None})
    assert s["miou"] == pytest.approx((4 / 7 + 4 / 6) / 2)  # b and c are not in the ground truth
    assert s["fw_iou"] == pytest.approx(6 / 11 * 4 / 7 + 5 / 11 * 4 / 6)
    assert s["accuracy"] == pytest.approx({"bg": 4 / 6, "a": 4 / 5, "b": None, "c": None})
    assert s["in_ground_truth"] == {"bg": True, "a": True, "b": False, "c": False}


def _folders(root: Path):
    gt, bpm, crf = root / "gt", root / "bpm", root / "crf"
    save_mask_png(gt / "x.png", GT)
    save_mask_png(bpm / "x.png", PRED)
    save_mask_png(crf / "x.png", np.where(GT == 255, 0, GT).astype(np.uint8))  # perfect
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return gt, bpm, crf


def test_several_folders_one_table_and_files(tmp_path, capsys):
    gt, bpm, crf = _folders(tmp_path)
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(bpm), "--pred", f"crf={crf}", "--gt", str(gt),
                 "--classes", str(tmp_path / "classes.txt"), "--out", str(out), "-q"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"\| bpm \| 57\.1 \| 66\.7 \| – \| – \| 61\.9 \|", printed)  # 'b', 'c': not in the ground truth
    assert re.search(r"\| crf \| 100\.0 \| 100\.0 \| – \| – \| 100\.0 \|", printed)
    assert "| bpm | 61.90 | 72.73 | 73.33 | 61.47 |" in printed  # mIoU, pixel acc, mean acc, fwIoU
    assert np.load(out / "confusion_bpm.npy").tolist() == EXPECTED
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"bpm", "crf"} and metrics["published"] is None
    assert metrics["results"]["crf"]["miou"] == 1.0
    rows = {r["class"]: r for r in csv.DictReader((out / "per_class.csv").open())}
    assert rows["bg"]["bpm"] == "57.14" and rows["a"]["crf"] == "100.00" and rows["b"]["bpm"] == ""
    assert rows["fw_iou"]["bpm"] == "61.47"
    assert "| method | bg | a | b | c | mIoU |" in (out / "per_class.md").read_text()
    for png in ("confusion_bpm.png", "confusion_crf.png", "iou_bars.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_folders_must_share_names_and_labels(tmp_path):
    gt, bpm, crf = _folders(tmp_path)
    save_mask_png(bpm / "y.png", PRED)
    with pytest.raises(VitpcmError, match=r"1 prediction\(s\) missing from .*crf: y"):
        evaluate_folders({"bpm": bpm, "crf": crf}, gt, NAMES, progress=False)
    assert list(folder_labels(["run/pseudo/val/masks", "run/pseudo/val/crf", "dl=/x/y"])) == ["bpm", "crf", "dl"]
    with pytest.raises(VitpcmError, match="both labelled 'bpm'"):
        folder_labels(["bpm=/a", "bpm=/b"])


def test_voc_table_carries_the_published_row():
    voc = class_list("voc12")
    cm = ConfusionMatrix(21)
    gt = np.array([[0, 0, 8, 8], [0, 15, 15, 8]])
    cm.update(np.array([[0, 8, 8, 8], [0, 15, 0, 8]]), gt)
    table = format_comparison({"bpm": cm.summary(voc)}, voc, published_row(voc))
    header = table.splitlines()[0]
    assert (
        header.startswith("| method | bkg | aero | bike |")
        and "| table |" in header
        and header.endswith("| tv | mIoU |")
    )
    assert "| published: voc12-deeplabv2-val |" in table and "| 70.3 |" in table
    ours = 100 * cm.miou()
    assert "| Δ bpm |" in table and f"{ours - 70.3:+.1f} |" in table
    # a row without per-class values (the authors' README gives the BPM mIoU only): the note says so
    bpm_row = published_row(voc, "voc12-bpm-val-vitb16")
    assert "only the mIoU is compared" in format_comparison({"bpm": cm.summary(voc)}, voc, bpm_row)
    assert "only the mIoU is compared" not in table  # Table S1's row has per-class values
    # with per-class values, the difference shows per class
    row = dict(published_row(voc), iou={"cat": 80.0})
    table = format_comparison({"bpm": cm.summary(voc)}, voc, row)
    delta = [line for line in table.splitlines() if line.startswith("| Δ bpm")][0].split("|")
    assert delta[2 + 8].strip() == f"{100 * cm.summary(voc)['iou']['cat'] - 80:+.1f}"


def test_coco_table_is_long_with_table_s2_row():
    coco = class_list("coco14")
    cm = ConfusionMatrix(81)
    cm.update(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [1, 0]]))
    table = format_comparison({"bpm": cm.summary(coco)}, coco, published_row(coco))
    lines = table.split("\n\n")[0].splitlines()
    assert lines[0] == "| class | bpm | published: coco14-deeplabv2-val | Δ bpm |"
    assert len(lines) == 2 + 81 + 1 and lines[-1].startswith("| mIoU |") and "| 45.0 |" in lines[-1]


def test_published_rows_are_documented_and_checked(capsys):
    data = load_published()
    docs = (Path(__file__).resolve().parents[2] / "docs" / "published.md").read_text()
    for row in data["rows"]:
        assert f"`{row['id']}`" in docs and f"{row['miou']}" in docs
        names = set(class_list(row["classes"]))
        assert set(row["iou"]) <= names  # per-class values, where present, use the class list's names
    defaults = [r["id"] for r in data["rows"] if r.get("default")]
    assert defaults == ["voc12-deeplabv2-val", "coco14-deeplabv2-val"]
    with pytest.raises(VitpcmError, match="no published row 'x'"):
        published_row(class_list("voc12"), "x")
    with pytest.raises(VitpcmError, match="is for the coco14 classes"):
        published_row(class_list("voc12"), "coco14-deeplabv2-val")
    assert published_row(class_list("voc12"), "none") is None
    assert published_row(NAMES) is None
