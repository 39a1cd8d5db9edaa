"""Synthetic generator and the VOC-layout loader."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitpcm.data.synthetic import CLASSES, generate, render_sample
from vitpcm.data.voc import VOCDataset
from vitpcm.errors import VitpcmError
from vitpcm.io import labels_from_mask


def test_render_is_deterministic_and_varied():
    a_img, a_mask = render_sample(11)
    b_img, b_mask = render_sample(11)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    sizes = {render_sample(s)[0].shape[:2] for s in range(12)}
    assert len(sizes) > 6  # varied sizes
    assert any(h != w for h, w in sizes)  # non-square


def test_masks_have_objects_and_ignore_borders():
    classes_seen = set()
    counts = []
    for seed in range(40):
        _, mask = render_sample(seed)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(CLASSES))) | {255}
        assert 255 in values  # object borders are void, as in VOC
        present = values - {0, 255}
        assert present, "every image holds at least one object"
        counts.append(len(present))
        classes_seen |= present
    assert classes_seen == set(range(1, len(CLASSES)))
    assert max(counts) >= 2  # several classes per image happen


def test_void_band_separates_labels():
    _, mask = render_sample(5)
    # no two different non-ignore labels touch horizontally or vertically
    a, b = mask[:, :-1], mask[:, 1:]
    touching = (a != b) & (a != 255) & (b != 255)
    assert not touching.any()


def test_generate_writes_voc_layout(synth_root):
    assert (synth_root / "classes.txt").read_text().split() == list(CLASSES)
    train = (synth_root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (synth_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 12 and len(val) == 6 and not set(train) & set(val)
    png = Image.open(synth_root / "SegmentationClass" / f"{train[0]}.png")
    assert png.mode == "P"
    jpg = Image.open(synth_root / "JPEGImages" / f"{train[0]}.jpg")
    assert jpg.size == png.size


def test_generate_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(VitpcmError, match="not empty"):
        generate(tmp_path, n_train=1, n_val=1, progress=False)


def test_voc_dataset_sample_dict(synth_root):
    ds = VOCDataset(synth_root, "train")
    assert ds.classes == list(CLASSES) and len(ds) == 12
    s = ds[0]
    h, w = s["size"]
    assert s["image"].shape == (3, h, w) and s["image"].dtype == torch.uint8
    assert s["mask"].shape == (h, w) and s["mask"].dtype == torch.int64
    expected = labels_from_mask(s["mask"].numpy(), len(CLASSES))
    assert torch.equal(s["labels"], torch.from_numpy(expected))
    assert s["labels"][0] == 1


def test_labels_from_mask_ignores_255():
    mask = np.array([[0, 2], [255, 2]], dtype=np.uint8)
    assert labels_from_mask(mask, 4).tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: r / "missing", "not found"),
        (lambda r: r, "no JPEGImages"),
    ],
)
def test_bad_roots(tmp_path, setup, message):
    with pytest.raises(VitpcmError, match=message):
        VOCDataset(setup(tmp_path), "train")


def test_empty_and_unknown_split(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("\n")
    with pytest.raises(VitpcmError, match="empty"):
        VOCDataset(tmp_path, "train")
    with pytest.raises(VitpcmError, match="split 'val' not found"):
        VOCDataset(tmp_path, "val")


def test_mask_value_outside_class_list(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "JPEGImages/a.jpg")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "SegmentationClass/a.png")
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    with pytest.raises(VitpcmError, match="outside the 2 classes"):
        VOCDataset(tmp_path, "train")[0]


def test_the_tagged_dataset_keeps_its_older_names():
    """SegmentationDataset was renamed TaggedImageDataset ("segment" is the DeepLab stage)."""
    from vitpcm.data import SegmentationDataset, TaggedImageDataset
    from vitpcm.data.pseudo import check_pseudo_masks, screen_pseudo_masks

    assert SegmentationDataset is TaggedImageDataset
    assert screen_pseudo_masks is check_pseudo_masks
