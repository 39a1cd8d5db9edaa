"""Figures and report.html: created, non-empty, self-contained (checked without a browser)."""

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image
from tests.conftest import TINY, TINY_SEGMENT
from tests.datafix import make_coco, make_folder, write_lines

from vitpcm.cli import main
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import ConfusionMatrix, confused_pairs
from vitpcm.stages.demo import demo as run_demo
from vitpcm.stages.predict import predict
from vitpcm.stages.report import report as write_report
from vitpcm.viz.figures import figure_heatmaps, figure_masks, plot_confusion, plot_iou_bars, plot_training_curves


def _png_ok(path: Path, min_side: int = 100) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side
        assert np.asarray(im.convert("L")).std() > 1  # not a blank canvas


def test_figures(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    probs = rng.dirichlet([1, 1], size=(30, 40)).transpose(2, 0, 1).astype(np.float32)
    names = ["background", "cat", "dog"]
    mask = (probs[1] > 0.5).astype(np.uint8) * 2
    gt = mask.copy()
    gt[0] = 255
    _png_ok(figure_heatmaps(image, probs, [0, 2], names, tmp_path / "s1.png", title="x"))
    _png_ok(figure_masks(image, {"bpm": mask, "crf": mask}, names, tmp_path / "s2.png", gt=gt))
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"epoch": e, "phase": "warmup" if e == 1 else "finetune", "lr": 1e-3, "loss": 2 - e / 5, "mce": 1.0,
             "et": 1 - e / 5, "reg": 0.01, "val_miou": 0.3 + e / 20} for e in (1, 2, 3)]  # fmt: skip
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "lo')  # torn last line
    _png_ok(plot_training_curves(metrics, tmp_path / "curves.png"))
    cm = ConfusionMatrix(3)
    cm.update(mask, gt)
    _png_ok(plot_iou_bars({"bpm": cm.summary(names)}, names, tmp_path / "bars.png"))
    _png_ok(plot_confusion(cm.matrix, names, tmp_path / "cm.png"))
    assert not list(tmp_path.glob(".*.tmp"))


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs, self.links, self.tags = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("href", "src"):
            if tag != "img" and a.get(key):
                self.links.append(a[key])


def check_self_contained(report: Path) -> _Refs:
    """Every image inline (a valid PNG), every link relative and resolving, nothing remote."""
    text = report.read_text(encoding="utf-8")
    refs = _Refs()
    refs.feed(text)
    assert "script" not in refs.tags and "iframe" not in refs.tags
    assert refs.imgs
    for src in refs.imgs:
        mime = src.split(";", 1)[0]
        assert mime in ("data:image/png", "data:image/jpeg") and src.startswith(f"{mime};base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == {"data:image/png": "PNG", "data:image/jpeg": "JPEG"}[mime]
            im.load()  # decodes completely
    for href in refs.links:
        url = urlparse(href)
        if url.fragment and not url.path:
            assert f'id="{url.fragment}"' in text  # in-page anchor
            continue
        assert not url.scheme and not url.netloc, href  # relative: works offline, wherever the run is copied
        assert (report.parent / unquote(url.path)).exists(), href
    return refs


def test_report_of_a_run(tiny_run, capsys):
    assert main(["report", str(tiny_run), "--samples", "2", "-q"]) == 0
    assert "val: bpm mIoU" in capsys.readouterr().out
    report = tiny_run / "report.html"
    refs = check_self_contained(report)
    text = report.read_text()
    for needle in ("Split val", "Per-class IoU", "pixel acc", "<td>bpm</td>", "<td>crf</td>", "Training",
                   "training curves", "heat map per present class", "Config (resolved)", "backbone: vit_tiny_patch16_224",
                   "Per-image mIoU of split val (6 images, worst first)", "by per-image mIoU (bpm): image | ground truth",
                   "Most confused class pairs", "Tags from the pooled scores", "mAP (percent)", "last val tag mean F1 / mAP"):  # fmt: skip
        assert needle in text, needle
    hrefs = set(refs.links)
    for target in (
        "pseudo/val/masks/",
        "pseudo/val/probs/",
        "pseudo/val/crf/",
        "config.yaml",
        "eval/val/per_class.csv",
        "eval/val/per_image.csv",
        "eval/val/tags.json",
    ):
        assert target in hrefs, target
    pairs = confused_pairs(np.load(tiny_run / "eval/val/confusion_bpm.npy"), 5)
    assert pairs  # a one-epoch model confuses classes
    # bars, 2 confusions, curves, 2 samples x (S2 + S1), the worst images, an example per confused pair
    assert len(refs.imgs) == 1 + 2 + 1 + 2 * 2 + 1 + len(pairs)
    rows = (tiny_run / "eval/val/per_image.csv").read_text().splitlines()
    assert rows[0] == "name,bpm_miou,crf_miou" and len(rows) == 7
    worst = [float(r.split(",")[1]) for r in rows[1:] if r.split(",")[1]]
    assert worst == sorted(worst)  # worst first
    for png in (tiny_run / "figures").rglob("*.png"):
        _png_ok(png, min_side=50)
    assert json.loads((tiny_run / "eval/val/metrics.json").read_text())["results"]["crf"]["miou"] >= 0


def test_report_shows_predict_overlays(tiny_run, synth_root, tmp_path):
    """`vitpcm predict --overlay` into RUN/predict: the report shows a gallery of them."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("figures", "report.html"))
    records = predict(run, [synth_root / "JPEGImages"], overlay=True, threshold=0.18, progress=False)
    write_report(run, samples=0, progress=False)
    refs = check_self_contained(run / "report.html")
    text = (run / "report.html").read_text()
    assert len(records) == 18 and "18 of 18 overlays shown" in text
    jpegs = [s for s in refs.imgs if s.startswith("data:image/jpeg")]
    assert len(jpegs) == 18 and "predict/predictions.jsonl" in refs.links
    first = records[0]
    assert f"{first['name']}: {', '.join(first['tags']) or 'background only'}" in text

    # a predict --out folder elsewhere: named with --predict
    elsewhere = tmp_path / "elsewhere"
    predict(run, [synth_root / "JPEGImages" / "val_00000.jpg", synth_root / "JPEGImages" / "val_00001.jpg"],
            out=elsewhere, overlay=True, progress=False)  # fmt: skip
    assert main(["report", str(run), "--samples", "0", "--predict", str(elsewhere), "-q"]) == 0
    check_self_contained(run / "report.html")
    assert "2 of 2 overlays shown" in (run / "report.html").read_text()
    assert main(["report", str(run), "--predict", str(tmp_path), "-q"]) == 2  # no overlays/ there


def test_confused_pairs_ranks_by_share_of_the_true_class():
    m = np.array([[90, 10, 0], [30, 60, 10], [0, 0, 0]])  # rows: ground truth
    assert confused_pairs(m, 5) == [(1, 0, 0.3, 30), (0, 1, 0.1, 10), (1, 2, 0.1, 10)]
    assert confused_pairs(np.diag([5, 5]), 3) == []


def test_report_needs_a_run_and_known_names(tiny_run, tmp_path):
    assert main(["report", str(tmp_path), "-q"]) == 2
    with pytest.raises(VitpcmError, match="not a run folder"):
        write_report(tmp_path)
    with pytest.raises(VitpcmError, match="not among the masks"):
        write_report(tiny_run, names=["nope"], progress=False)


def test_demo_runs_crf_and_writes_report(tmp_path, synth_root, monkeypatch):
    summary = run_demo(tmp_path / "demo", n_train=8, n_val=4,
                       overrides=[*TINY, *TINY_SEGMENT, "train.epochs=1", "crf.workers=2"], progress=False)  # fmt: skip
    assert 0 <= summary["bpm_miou"] <= 1 and 0 <= summary["crf_miou"] <= 1
    # the verification chain: train split's CRF masks -> DeepLab -> its val masks + CRF
    assert 0 <= summary["segment_miou"] <= 1 and 0 <= summary["segment_miou_no_crf"] <= 1
    assert summary["segment_training"]["images"] == 8
    assert len(list((tmp_path / "demo/segment/pseudo/val/crf").glob("*.png"))) == 4
    assert "DeepLab + CRF" in summary["table"]
    saved = json.loads((tmp_path / "demo/summary.json").read_text())
    assert saved["crf_miou"] == summary["crf_miou"] and "crf" in saved["seconds"]
    assert len(list((tmp_path / "demo/run/pseudo/val/crf").glob("*.png"))) == 4
    check_self_contained(tmp_path / "demo/run/report.html")


@pytest.mark.parametrize("fmt", ["coco", "folder"])
def test_crf_and_report_on_other_formats(fmt, tmp_path, capsys):
    """COCO (masks drawn from the annotations) and the own-folder format (a nested name,
    an image without mask): infer --crf and the report go through the dataset's files."""
    root = tmp_path / fmt
    if fmt == "coco":
        make_coco(root)
        data = ["data.format=coco", f"data.root={root}", "data.classes=coco14"]
    else:
        make_folder(root)
        write_lines(root / "splits/train.txt", ["a", "b", "sub/c"])
        write_lines(root / "splits/val.txt", ["a", "sub/c"])
        data = ["data.format=folder", f"data.root={root}"]
    run = tmp_path / "run"
    assert main(["train", "synthetic", *TINY, *data, "train.epochs=1", "--out", str(run), "-q"]) == 0, (
        capsys.readouterr().err
    )
    assert main(["infer", str(run), "--split", "val", "--crf", "crf.workers=1", "-q"]) == 0, capsys.readouterr().err
    summary = json.loads((run / "pseudo/val/summary.json").read_text())
    assert 0 <= summary["crf_miou"] <= 1
    if fmt == "folder":
        assert (run / "pseudo/val/crf/sub/c.png").is_file()
    assert main(["report", str(run), "--samples", "2", "-q"]) == 0
    check_self_contained(run / "report.html")
    metrics = json.loads((run / "eval/val/metrics.json").read_text())
    assert set(metrics["results"]) == {"bpm", "crf"}
    if fmt == "coco":
        assert metrics["published"]["id"] == "coco14-deeplabv2-val"  # the Table S2 row beside ours
