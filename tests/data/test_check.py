"""``vitpcm check-data``: awkward images pass and convert correctly, every broken case is
reported with its file, and training refuses or (``--skip-bad``) skips broken items."""

import json

import numpy as np
import pytest
from PIL import Image
from tests.conftest import TINY
from tests.datafix import draw_mask, jpeg_bytes, make_coco, make_folder, make_voc, noise_image, png_16bit_rgb, save_jpg

from vitpcm.cli import main
from vitpcm.config import load_config
from vitpcm.data.check import check_config, check_dataset
from vitpcm.data.folder import FolderDataset
from vitpcm.data.voc import VOCDataset
from vitpcm.errors import VitpcmError
from vitpcm.io import save_mask_png


def _kinds(report):
    """name -> its problem kinds, joined by '+' (a listed name may lack both image and mask)."""
    kinds = {}
    for s in report.splits:
        for p in s.problems:
            kinds.setdefault(p.name, []).append(p.kind)
    return {n: "+".join(sorted(k)) for n, k in kinds.items()}


# ----------------------------------------------------------------------------- awkward, not broken
@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """An own folder whose images are awkward in every way the check must accept."""
    root = tmp_path_factory.mktemp("awkward")
    img = root / "images"
    img.mkdir()
    rgb = noise_image(12, 16, 0)
    Image.fromarray(rgb[..., 0]).save(img / "grey.jpg")
    rgba = np.dstack([rgb, np.full((12, 16), 255, np.uint8)])
    rgba[:, :8, 3] = 0  # left half fully transparent
    Image.fromarray(rgba).save(img / "rgba.png")
    Image.fromarray(rgb).convert("P").save(img / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(img / "cmyk.jpg")
    g16 = np.zeros((12, 16), np.uint16)
    g16[:, 4:8], g16[:, 8:] = 32768, 65535
    Image.fromarray(g16).save(img / "grey16.png")
    rgb16 = np.zeros((12, 16, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 65535, 257 * 100
    png_16bit_rgb(img / "rgb16.png", rgb16)
    buf = img / "png_named.jpg"  # PNG bytes behind a .jpg name
    Image.fromarray(rgb).save(buf, format="PNG")
    stored = Image.fromarray(noise_image(12, 20, 5))  # stored 20 wide x 12 high ...
    exif = stored.getexif()
    exif[0x0112] = 6  # ... displayed rotated by 90 degrees: 12 wide x 20 high
    (img / "rotated.jpg").write_bytes(jpeg_bytes(np.asarray(stored), exif=exif))
    save_jpg(img / "bg_only.jpg", noise_image(10, 10, 6))
    names = ["grey", "rgba", "palette", "cmyk", "grey16", "rgb16", "png_named", "rotated", "bg_only"]
    (root / "tags.csv").write_text("".join(f"{n},thing\n" for n in names))
    save_mask_png(root / "masks" / "rotated.png", draw_mask(20, 12, [(1, 2, 2, 15, 8)]))  # as displayed
    save_mask_png(root / "masks" / "bg_only.png", np.zeros((10, 10), np.uint8))  # background only: fine
    return root


def test_awkward_images_are_converted_not_reported(awkward):
    ds = FolderDataset(awkward)
    report = check_dataset(ds, workers=2, progress=False)
    assert not report.problems, [p.line("all") for p in report.problems]
    notes = {i.name: i.notes for i in report.items}
    assert notes["grey"] == ["greyscale"] and notes["palette"] == ["palette"] and notes["cmyk"] == ["CMYK"]
    assert notes["rgba"] == ["transparency"] and notes["grey16"] == ["16-bit"]
    assert notes["png_named"] == ["PNG data behind .jpg suffix"] and notes["rotated"] == ["EXIF orientation"]
    assert sum(i.background_only for i in report.items) == 1
    sample = {n: ds[i] for i, n in enumerate(ds.names)}
    # 16-bit: scaled over the full range, not clipped
    g = sample["grey16"]["image"][0, 0].numpy()
    assert (g[0], g[5], g[10]) == (0, 128, 255)
    assert sample["rgb16"]["image"][:, 0, 0].tolist() == [255, 0, 100]
    # transparent pixels are white, opaque ones keep their colour
    assert (sample["rgba"]["image"][:, :, :8] == 255).all()
    assert np.array_equal(sample["rgba"]["image"][:, :, 8:].permute(1, 2, 0).numpy(), noise_image(12, 16, 0)[:, 8:])
    assert (sample["grey"]["image"][0] == sample["grey"]["image"][2]).all()
    assert sample["rotated"]["size"] == (20, 12) and sample["rotated"]["mask"].shape == (20, 12)
    assert sample["cmyk"]["image"].shape == (3, 12, 16)


def test_check_data_cli_on_clean_data(awkward, capsys, tmp_path):
    js = tmp_path / "report.json"
    code = main(["check-data", "synthetic", "data.format=folder", f"data.root={awkward}", "data.train_split=all",
                 "data.val_split=", "--json", str(js), "-q"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "OK: no problems" in out
    assert "images per class" in out and "thing" in out and "converted on reading" in out
    assert "1 masks hold only background (kept)" in out
    data = json.loads(js.read_text())
    assert data["ok"] and data["splits"][0]["images_per_class"]["thing"] == 9
    assert data["splits"][0]["sizes"]["height"]["max"] == 20


# ----------------------------------------------------------------------------- broken
@pytest.fixture()
def broken_voc(tmp_path):
    """VOC fixture with one broken item per kind in the train split."""
    make_voc(tmp_path)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for n in ("trunc", "garbage", "small_mask", "bad_value"):
        save_jpg(voc / "JPEGImages" / f"{n}.jpg", noise_image(16, 16, 9))
        save_mask_png(voc / "SegmentationClass" / f"{n}.png", draw_mask(16, 16, [(3, 2, 2, 8, 8)]))
    data = (voc / "JPEGImages/trunc.jpg").read_bytes()
    (voc / "JPEGImages/trunc.jpg").write_bytes(data[: len(data) // 2])
    (voc / "JPEGImages/garbage.jpg").write_bytes(b"this is not an image at all")
    save_mask_png(voc / "SegmentationClass/small_mask.png", np.zeros((15, 16), np.uint8))
    save_mask_png(voc / "SegmentationClass/bad_value.png", draw_mask(16, 16, [(30, 2, 2, 8, 8)]))
    (voc / "SegmentationClass/c.png").unlink()  # listed, image there, mask gone
    names = ["a", "b", "c", "a", "missing", "trunc", "garbage", "small_mask", "bad_value"]
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(names) + "\n")
    return voc


EXPECTED_VOC = {
    "a": "duplicate-name",
    "c": "missing-mask",
    "missing": "missing-image+missing-mask",
    "trunc": "truncated-image",
    "garbage": "unreadable-image",
    "small_mask": "size-mismatch",
    "bad_value": "bad-mask-value",
}


def test_check_finds_every_broken_voc_item(broken_voc):
    cfg = load_config("synthetic", [f"data.root={broken_voc}"])
    report = check_config(cfg, workers=2, progress=False)
    assert not report.ok and _kinds(report) == EXPECTED_VOC
    lines = "\n".join(report.problem_lines())
    assert "JPEGImages/missing.jpg" in lines and "SegmentationClass/small_mask.png" in lines
    assert "mask values [30]" in lines and "is 16x15 but its image is 16x16" in lines
    assert report.splits[1].split == "val" and not report.splits[1].problems
    with pytest.raises(VitpcmError, match="problem"):
        VOCDataset(broken_voc, "train")  # strict (the API default) refuses at once


def test_check_finds_broken_folder_items(tmp_path):
    make_folder(tmp_path)
    img = tmp_path / "images"
    save_jpg(img / "a2.jpg", noise_image(8, 8, 1))
    Image.fromarray(noise_image(8, 8, 2)).save(img / "a2.png")  # two images named a2
    save_jpg(img / "untagged.jpg", noise_image(8, 8, 3))
    save_jpg(img / "empty.jpg", noise_image(8, 8, 4))
    save_jpg(img / "typo.jpg", noise_image(8, 8, 5))
    save_jpg(img / "twice.jpg", noise_image(8, 8, 6))
    stored = Image.fromarray(noise_image(8, 14, 7))
    exif = stored.getexif()
    exif[0x0112] = 8
    (img / "turned.jpg").write_bytes(jpeg_bytes(np.asarray(stored), exif=exif))
    save_mask_png(tmp_path / "masks" / "turned.png", np.zeros((8, 14), np.uint8))  # stored orientation: wrong
    with open(tmp_path / "tags.csv", "a") as f:
        f.write("a2.jpg,cat\nempty.jpg,\ntypo.jpg,dgo\ntwice.jpg,cat\ntwice.jpg,dog\nghost.jpg,cat\nturned.jpg,cat\n")
    cfg = load_config(
        "synthetic", ["data.format=folder", f"data.root={tmp_path}", "data.train_split=all", "data.val_split="]
    )
    inferred = check_config(cfg, workers=1, progress=False)  # no classes.txt: 'dgo' becomes a class ...
    assert "class 'dgo' looks like 'dog': a typo in tags.csv?" in inferred.format()  # ... and the report says so
    (tmp_path / "classes.txt").write_text("background\nbird\ncat\ndog\n")
    report = check_config(cfg, workers=1, progress=False)
    assert _kinds(report) == {
        "a2": "duplicate-name", "untagged": "no-tags", "empty": "no-tags", "typo": "unknown-class",
        "twice": "duplicate-name", "ghost": "missing-image", "turned": "size-mismatch",
    }  # fmt: skip
    lines = "\n".join(report.problem_lines())
    assert "did you mean 'dog'" in lines and "names no class" in lines and "has no row in tags.csv" in lines
    assert "masks must follow the image as displayed" in lines


def test_check_finds_broken_coco_items(tmp_path):
    make_coco(tmp_path)
    ann = tmp_path / "annotations" / "instances_train2014.json"
    data = json.loads(ann.read_text())
    data["images"][1]["height"] += 1  # annotations for another picture size
    data["annotations"].append(dict(data["annotations"][0], id=99, category_id=12))  # 12: no such category
    ann.write_text(json.dumps(data))
    (tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    cfg = load_config("coco14", [f"data.root={tmp_path}", "data.coco_gt=vitpcm"])  # the fixture is under 256 px
    report = check_config(cfg, workers=1, progress=False)
    assert _kinds(report) == {
        "COCO_train2014_000000000001": "bad-annotation",
        "COCO_train2014_000000000002": "size-mismatch",
        "COCO_val2014_000000000001": "missing-image",
    }


def test_cli_check_data_and_train_refuse_broken_data(broken_voc, tmp_path, capsys):
    args = [f"data.root={broken_voc}"]
    assert main(["check-data", "synthetic", *args, "-q"]) == 1
    out = capsys.readouterr().out
    assert "problems (8)" in out and "BROKEN: 7 item(s) cannot be used" in out and "--skip-bad" in out
    run = tmp_path / "run"
    assert main(["train", "synthetic", *TINY, *args, "--out", str(run), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "8 problem(s) in the data, training not started" in err[0] and "--skip-bad" in err[0]
    assert len(err) == 1 + 8 and all(line.startswith("[train] ") for line in err[1:])
    assert not (run / "checkpoints").exists()


def test_train_skip_bad_leaves_broken_items_out(broken_voc, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "synthetic", *TINY, f"data.root={broken_voc}", "train.epochs=1", "--out", str(run),
                 "--skip-bad", "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = [line.split("\t") for line in (run / "skipped.txt").read_text().splitlines()]
    skipped = {}
    for r in rows:
        skipped.setdefault(r[1], []).append(r[2])
    assert {n: "+".join(sorted(k)) for n, k in skipped.items()} == EXPECTED_VOC and all(r[0] == "train" for r in rows)
    assert (run / "checkpoints/last.pt").is_file()
