"""Loaders of the real formats on tiny fixtures: VOC 2012 + SBD (both forms), COCO, own folder.

Each round trip compares the masks a loader returns with the ones the fixture drew.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from tests.datafix import (
    SBD_TRAIN,
    SBD_VAL,
    TRAINAUG,
    VOC_TRAIN,
    VOC_VAL,
    make_coco,
    make_folder,
    make_voc,
    write_lines,  # fmt: skip
)

from vitpcm.classes import class_list
from vitpcm.config import load_config
from vitpcm.data import build_dataset
from vitpcm.data.coco import COCODataset, prepare_coco, rasterize
from vitpcm.data.folder import FolderDataset
from vitpcm.data.voc import VOCDataset
from vitpcm.errors import VitpcmError
from vitpcm.io import labels_from_mask, read_mask_png


def _assert_sample(s, num_classes):
    h, w = s["size"]
    assert s["image"].shape == (3, h, w) and s["image"].dtype == torch.uint8
    assert s["labels"].shape == (num_classes,) and s["labels"].dtype == torch.float32 and s["labels"][0] == 1
    if "mask" in s:
        assert s["mask"].shape == (h, w) and s["mask"].dtype == torch.int64


@pytest.fixture(scope="module")
def voc_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocsbd")
    return root, make_voc(root, sbd="release")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, make_coco(root)


# ----------------------------------------------------------------------------- VOC
def test_voc_splits_round_trip(voc_release):
    root, masks = voc_release
    voc = root / "VOCdevkit" / "VOC2012"
    for split, names in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", VOC_TRAIN + VOC_VAL)):
        ds = VOCDataset(voc, split)
        assert ds.names == names and ds.has_masks and ds.num_classes == 21
        for i, n in enumerate(ds.names):
            s = ds[i]
            _assert_sample(s, 21)
            assert np.array_equal(s["mask"].numpy(), masks["voc"][n])
            assert np.array_equal(s["labels"].numpy(), labels_from_mask(masks["voc"][n], 21))


def test_voc_test_split_tags_from_a_tag_file(voc_release, tmp_path):
    voc = voc_release[0] / "VOCdevkit" / "VOC2012"
    with pytest.raises(VitpcmError, match="no masks .* data.tags"):
        VOCDataset(voc, "test")
    ds = VOCDataset(voc, "test", require_masks=False)
    assert not ds.has_masks and "labels" not in ds[0] and "mask" not in ds[0]
    tags = tmp_path / "test_tags.csv"
    tags.write_text("t1.jpg,cat;dog\nt2,person\n")
    ds = VOCDataset(voc, "test", tags=tags)
    assert not ds.has_masks
    assert torch.nonzero(ds[0]["labels"]).flatten().tolist() == [0, 8, 12]
    assert torch.nonzero(ds[1]["labels"]).flatten().tolist() == [0, 15]


def test_trainaug_from_the_sbd_release(voc_release):
    root, masks = voc_release
    voc = root / "VOCdevkit" / "VOC2012"
    # VOC train (3) + SBD train (4) + SBD val (2), minus VOC val (d, e), without repeats = 6
    assert TRAINAUG == ["a", "b", "c", "f", "g", "h"]
    assert len(set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) == 8
    for spec in (root / "benchmark_RELEASE", root / "benchmark_RELEASE" / "dataset", root):
        ds = VOCDataset(voc, "trainaug", sbd=spec)
        assert ds.names == TRAINAUG
    assert any("trainaug = VOC train (3)" in line for line in ds.info)
    assert ds.image_path("h") == root / "benchmark_RELEASE/dataset/img/h.jpg"  # not in JPEGImages: SBD's img/
    assert ds.mask_path("b").suffix == ".png" and ds.mask_path("f").suffix == ".mat"
    for i, n in enumerate(ds.names):
        s = ds[i]
        _assert_sample(s, 21)
        expected = masks["voc"][n] if n in masks["voc"] else masks["sbd"][n]  # VOC's mask wins where both exist
        assert np.array_equal(s["mask"].numpy(), expected), n
    assert not np.array_equal(masks["voc"]["b"], masks["sbd"]["b"])
    # split name alias
    assert VOCDataset(voc, "train_aug", sbd=root).names == TRAINAUG


def test_trainaug_from_the_converted_folder(tmp_path):
    masks = make_voc(tmp_path, sbd="converted")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    ds = VOCDataset(voc, "trainaug")  # SegmentationClassAug/ and train_aug.txt found by default
    assert ds.names == TRAINAUG
    for i, n in enumerate(ds.names):
        expected = masks["voc"][n] if n in masks["voc"] else masks["sbd"][n]
        assert np.array_equal(ds[i]["mask"].numpy(), expected), n
    # a list that holds a val name: the name is left out, and the report says so
    write_lines(voc / "train_aug.txt", TRAINAUG + ["d"])
    ds = VOCDataset(voc, "trainaug")
    assert ds.names == TRAINAUG and any("in VOC val" in line for line in ds.info)
    # no list at all: derived from the PNGs, the same set
    (voc / "train_aug.txt").unlink()
    assert VOCDataset(voc, "trainaug").names == TRAINAUG
    # the authors' layout: ImageSets/Segmentation/trainaug.txt
    lines = [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png" for n in TRAINAUG]
    write_lines(voc / "ImageSets/Segmentation/trainaug.txt", lines)
    assert VOCDataset(voc, "trainaug").names == TRAINAUG


def test_trainaug_without_sbd_says_where_to_put_it(tmp_path):
    make_voc(tmp_path)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(VitpcmError, match="needs the SBD masks: set data.sbd"):
        VOCDataset(voc, "trainaug")
    with pytest.raises(VitpcmError, match="data.sbd=.* not found"):
        VOCDataset(voc, "trainaug", sbd=tmp_path / "nope")


# ----------------------------------------------------------------------------- COCO
def test_coco_round_trip(coco):
    root, expected = coco
    ds = COCODataset(root, "train", classes="coco14")
    assert ds.num_classes == 81 and ds.names == sorted(n for n in expected if "train" in n)
    assert any("2 images without a non-crowd annotation" in line for line in ds.info)
    cls = class_list("coco14")
    for i, n in enumerate(ds.names):
        s = ds[i]
        _assert_sample(s, 81)
        assert np.array_equal(s["mask"].numpy(), expected[n]), n
    # image 1: small dog stays visible in front of the large person; tags person + dog
    s0 = ds[0]
    assert torch.nonzero(s0["labels"]).flatten().tolist() == [0, cls.index("person"), cls.index("dog")]
    # image 2: crowd of people is ignore (255) but person is still tagged; chair painted over the crowd
    s1 = ds[1]
    assert 255 in s1["mask"] and (s1["mask"] == cls.index("chair")).sum() == 16
    assert s1["labels"][cls.index("person")] == 1
    val = COCODataset(root, "val2014", classes="coco14")
    assert len(val) == 1 and np.array_equal(val[0]["mask"].numpy(), expected[val.names[0]])


def test_coco_classes_default_to_the_categories(coco):
    root, expected = coco
    ds = COCODataset(root, "train")
    assert ds.classes == ["background", "person", "cat", "dog", "chair"]
    s = ds[0]
    assert set(np.unique(s["mask"].numpy()).tolist()) == {0, 1, 3}
    with pytest.raises(VitpcmError, match="category 'cat' .* not in the class list"):
        COCODataset(root, "train", classes=["background", "person", "dog", "chair"])
    with pytest.raises(VitpcmError, match="instances_test2014.json not found"):
        COCODataset(root, "test")


def test_rasterize_order_is_by_area_not_by_file_order():
    big = (1, 0, 1, [[0, 0, 10, 0, 10, 10, 0, 10]])
    small = (2, 0, 2, [[2, 2, 5, 2, 5, 5, 2, 5]])
    for anns in ([big, small], [small, big]):
        m = rasterize(anns, 12, 12)
        assert (m == 2).sum() == 9 and (m == 1).sum() == 100 - 9


def test_prepare_coco_writes_pngs_once_and_the_loader_reads_them(coco, tmp_path, monkeypatch):
    import vitpcm.data.coco as coco_module

    src, expected = coco
    root = tmp_path / "coco"
    shutil.copytree(src, root)
    monkeypatch.setattr(coco_module, "_POOL_MIN", 0)  # exercise the process pool on 3 masks
    result = prepare_coco(root, classes="coco14", workers=2, progress=False)
    assert result["train2014"]["written"] == 2 and result["val2014"]["written"] == 1
    for n, m in expected.items():
        split = "train2014" if "train" in n else "val2014"
        assert np.array_equal(read_mask_png(root / "masks" / split / f"{n}.png"), m)
    assert (root / "masks" / "train2014.txt").read_text().split() == sorted(n for n in expected if "train" in n)
    again = prepare_coco(root, classes="coco14", workers=1, progress=False)  # resumable: nothing left to do
    assert again["train2014"] == {"written": 0, "kept": 2, "failed": 0, "problems": 0}
    ds = COCODataset(root, "train", classes="coco14")
    assert any("2 read from" in line for line in ds.info)
    assert ds.mask_path(ds.names[0]).suffix == ".png"
    for i, n in enumerate(ds.names):
        assert np.array_equal(ds[i]["mask"].numpy(), expected[n])
    with pytest.raises(VitpcmError, match="prepared for another class list"):
        COCODataset(root, "train")  # default classes: the 4 categories, not what the PNGs index
    with pytest.raises(VitpcmError, match="made for another class list"):
        prepare_coco(root, workers=1, progress=False)


# ----------------------------------------------------------------------------- own folder
def test_folder_round_trip_and_inferred_classes(tmp_path):
    masks = make_folder(tmp_path)
    ds = FolderDataset(tmp_path)
    assert ds.classes == ["background", "bird", "cat", "dog"] and ds.names == ["a", "b", "sub/c"]
    assert ds.has_masks and any("1 of 3 images have no mask" in line for line in ds.info)
    tags = {n: torch.nonzero(ds[i]["labels"]).flatten().tolist() for i, n in enumerate(ds.names)}
    assert tags == {"a": [0, 2], "b": [0, 1, 3], "sub/c": [0, 2, 3]}
    for i, n in enumerate(ds.names):
        s = ds[i]
        _assert_sample(s, 4)
        if n in masks:
            assert np.array_equal(s["mask"].numpy(), masks[n])
        else:  # no ground truth: all ignore, counts for nothing in the mIoU
            assert (s["mask"] == 255).all()


def test_folder_json_tags_splits_and_given_classes(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "tags.csv").unlink()
    (tmp_path / "tags.json").write_text(json.dumps([
        {"image": "a.jpg", "tags": ["cat"]}, {"image": "b.png", "tags": "bird;dog"},
        {"image": "sub/c.jpeg", "tags": ["dog", "cat"]},
    ]))  # fmt: skip
    (tmp_path / "classes.txt").write_text("background\ndog\ncat\nbird\nfish\n")
    write_lines(tmp_path / "splits" / "train.txt", ["a", "sub/c.jpeg"])
    ds = FolderDataset(tmp_path, "train")
    assert ds.classes[-1] == "fish" and ds.names == ["a", "sub/c"]
    assert torch.nonzero(ds[1]["labels"]).flatten().tolist() == [0, 1, 2]
    with pytest.raises(VitpcmError, match="split 'val' not found.*all"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "tags.csv").write_text("a.jpg,cat\n")
    with pytest.raises(VitpcmError, match="both tags.csv and tags.json"):
        FolderDataset(tmp_path)


def test_build_dataset_dispatches_on_data_format(voc_release, coco, tmp_path):
    make_folder(tmp_path)
    cases = [
        (["data.format=folder", f"data.root={tmp_path}"], "all", "FolderDataset"),
        (["data.format=coco", f"data.root={coco[0]}", "data.classes=coco14"], "train", "COCODataset"),
        ([f"data.root={voc_release[0] / 'VOCdevkit/VOC2012'}", f"data.sbd={voc_release[0]}"], "trainaug", "VOCDataset"),
    ]
    for overrides, split, kind in cases:
        ds = build_dataset(load_config("synthetic", overrides).data, split)
        assert type(ds).__name__ == kind and len(ds) > 0
    with pytest.raises(VitpcmError, match="data.format must be voc, coco or folder"):
        load_config("synthetic", ["data.format=kitti"])


# ----------------------------------------------------------------------------- train, infer, evaluate
@pytest.mark.parametrize("fmt", ["voc-trainaug", "coco", "folder"])
def test_train_infer_evaluate_on_each_format(fmt, voc_release, coco, tmp_path, capsys):
    """Each format through the CLI: train (1 epoch, tiny model), infer on val, evaluate the
    masks it wrote against the masks on disk."""
    from tests.conftest import TINY

    from vitpcm.cli import main

    if fmt == "voc-trainaug":
        root = voc_release[0] / "VOCdevkit" / "VOC2012"
        data = [f"data.root={root}", f"data.sbd={voc_release[0]}", "data.train_split=trainaug"]
        gt, classes, split_file = root / "SegmentationClass", "voc12", root / "ImageSets/Segmentation/val.txt"
    elif fmt == "coco":
        root = tmp_path / "coco"
        shutil.copytree(coco[0], root)
        assert main(["prepare", "coco", "--root", str(root), "--classes", "coco14", "--workers", "1", "-q"]) == 0
        data = ["data.format=coco", f"data.root={root}", "data.classes=coco14"]
        gt, classes, split_file = root / "masks/val2014", "coco14", root / "masks/val2014.txt"
    else:
        root = tmp_path / "own"
        make_folder(root)
        write_lines(root / "splits/train.txt", ["a", "b", "sub/c"])
        write_lines(root / "splits/val.txt", ["a", "b"])
        (root / "classes.txt").write_text("background\nbird\ncat\ndog\n")
        data = ["data.format=folder", f"data.root={root}"]
        gt, classes, split_file = root / "masks", str(root / "classes.txt"), root / "splits/val.txt"
    run = tmp_path / "run"
    assert main(["train", "synthetic", *TINY, *data, "train.epochs=1", "--out", str(run), "-q"]) == 0, (
        capsys.readouterr().err
    )
    assert main(["infer", str(run), "--split", "val", "-q"]) == 0, capsys.readouterr().err
    assert "mIoU" in capsys.readouterr().out
    pred = run / "pseudo" / "val" / "masks"
    evaluate = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--classes", classes, "--split-file", str(split_file)]
    assert main([*evaluate, "-q"]) == 0
    assert "mIoU" in capsys.readouterr().out
