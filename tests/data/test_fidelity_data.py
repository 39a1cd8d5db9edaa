"""Fidelity switches on the data side (docs/reproduce.md): the authors' COCO ground truth,
tags from the resized mask, background tag from the mask, unclipped 0-255 colour jitter,
align_corners resampling. Each test fails if its switch stops doing what the authors do,
or if the default stops being vitpcm's behaviour."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.datafix import make_coco

import vitpcm.data.coco as coco_module
from vitpcm.classes import class_list
from vitpcm.data.coco import COCODataset, prepare_coco, rasterize
from vitpcm.data.jitter import _tf_hsv_to_rgb, _tf_rgb_to_hsv, color_jitter, jitter_authors_with
from vitpcm.data.transforms import (
    EvalTransform,
    TagRule,
    TrainTransform,
    map_to_et_grid,
    resize_image,
    resize_mask,
    sampled_by_resize,
)
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png

CLS = class_list("coco14")
PERSON, CAT, DOG, CHAIR = (CLS.index(n) for n in ("person", "cat", "dog", "chair"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root)
    return root


def _aug(**kw):
    base = dict(brightness=0.2, contrast=[0.5, 2.0], saturation=[0.5, 1.5], hue=0.1, grayscale=0.0,
                flip_lr=0.0, flip_ud=0.0, transpose=0.0, crop=0.0, jitter_space="clamped")  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------------------- 7: COCO
def test_rasterize_authors_first_annotation_wins_crowds_painted():
    big = (1, 0, 1, [[0, 0, 10, 0, 10, 10, 0, 10]])
    small = (2, 0, 2, [[2, 2, 5, 2, 5, 5, 2, 5]])
    assert (rasterize([big, small], 12, 12, gt="authors") == 2).sum() == 0  # the big one came first
    assert (rasterize([small, big], 12, 12, gt="authors") == 2).sum() == 9
    crowd = (3, 1, 3, [[0, 0, 6, 0, 6, 6, 0, 6]])
    assert (rasterize([crowd], 12, 12, gt="authors") == 3).sum() == 36  # not 255
    assert (rasterize([crowd], 12, 12) == 255).sum() == 36  # vitpcm: ignore


def test_coco_authors_ground_truth_filters_and_tags(coco, monkeypatch):
    monkeypatch.setattr(coco_module, "AUTHORS_MIN_SIDE", 15)  # the fixture's images are tiny; theirs: 256
    ds = COCODataset(coco, "train", classes="coco14", gt="authors")
    # image 3 (14 x 14, crowd only) is under 15 px; image 4 (no annotation) has one mask value
    assert ds.names == ["COCO_train2014_000000000001", "COCO_train2014_000000000002"]
    assert any("1 images with a side under 15 px and 1 with a single mask value" in line for line in ds.info)
    s = ds[1]
    mask = s["mask"].numpy()
    assert 255 not in mask and (mask == PERSON).any()  # the crowd is painted with its class
    assert not (mask == CHAIR).any()  # the chair lies under the crowd, which came first in the file
    assert torch.nonzero(s["labels"]).flatten().tolist() == [0, PERSON, CAT]  # tags from the mask: no chair
    vit = COCODataset(coco, "train", classes="coco14")  # vitpcm: crowd ignore, chair on top, chair tagged
    assert vit[1]["labels"][CHAIR] == 1 and 255 in vit[1]["mask"]


def test_coco_authors_keeps_crowd_only_images(coco, monkeypatch):
    monkeypatch.setattr(coco_module, "AUTHORS_MIN_SIDE", 0)
    ds = COCODataset(coco, "train", classes="coco14", gt="authors")
    assert "COCO_train2014_000000000003" in ds.names and "COCO_train2014_000000000004" not in ds.names
    with pytest.raises(VitpcmError, match="data.coco_gt"):
        COCODataset(coco, "train", gt="theirs")


def test_prepare_coco_authors_writes_their_masks_and_the_loader_checks_the_kind(coco, tmp_path, monkeypatch):
    monkeypatch.setattr(coco_module, "AUTHORS_MIN_SIDE", 0)
    root = tmp_path / "coco"
    shutil.copytree(coco, root)
    result = prepare_coco(root, classes="coco14", workers=1, progress=False, gt="authors")
    assert result["train2014"]["written"] == 3 and result["train2014"]["dropped"] == 1
    assert (root / "masks" / "gt.txt").read_text().strip() == "authors"
    listed = (root / "masks" / "train2014.txt").read_text().split()
    assert listed == [f"COCO_train2014_00000000000{i}" for i in (1, 2, 3)]
    png = read_mask_png(root / "masks" / "train2014" / "COCO_train2014_000000000002.png")
    assert 255 not in png and not (png == CHAIR).any()
    ds = COCODataset(root, "train", classes="coco14", gt="authors")
    assert ds.names == listed and any("3 read from" in line for line in ds.info)
    assert np.array_equal(ds[1]["mask"].numpy(), png)
    with pytest.raises(VitpcmError, match="prepared with data.coco_gt=authors"):
        COCODataset(root, "train", classes="coco14")
    with pytest.raises(VitpcmError, match="made with --gt authors"):
        prepare_coco(root, classes="coco14", workers=1, progress=False)


# ----------------------------------------------------------------------------- 5: tags
def test_tag_rule_background_and_resized_mask():
    mask = torch.zeros(40, 40, dtype=torch.int64)
    mask[:, :] = 3  # class 3 everywhere ...
    mask[0, 1] = 5  # ... a one-pixel sliver of class 5
    labels = torch.tensor([1.0, 0, 0, 1, 0, 1])
    assert torch.equal(TagRule()(labels, mask, 8), labels)  # the default changes nothing
    assert TagRule("from_mask")(labels, mask, 8).tolist() == [0, 0, 0, 1, 0, 1]  # no background pixel
    out = TagRule("from_mask", "resized")(labels, mask, 8)  # at 8 x 8 the sliver is not sampled
    assert out.tolist() == [0, 0, 0, 1, 0, 0]
    mask[20:, :] = 0
    assert TagRule("from_mask", "resized")(labels, mask, 8).tolist() == [1, 0, 0, 1, 0, 0]
    assert torch.equal(TagRule("from_mask", "resized")(labels, None, 8), labels)  # no mask: tags kept


def test_resize_mask_nearest_conventions():
    src = torch.arange(10).reshape(1, 10).expand(2, 10)
    assert resize_mask(src, (2, 4))[0].tolist() == [0, 2, 5, 7]  # floor(i * 10 / 4)
    assert resize_mask(src, (2, 4), align_corners=True)[0].tolist() == [0, 3, 6, 9]  # round(i * 9 / 3)


@pytest.mark.parametrize("align_corners", [False, True])
def test_the_tag_rule_reads_the_values_the_resize_keeps(align_corners):
    """sampled_by_resize (what TagRule reads) holds exactly the values of the resized mask,
    shrinking (slivers lost) and enlarging (the 960 inference side: every pixel kept)."""
    gen = torch.Generator().manual_seed(0)
    for h, w, side in ((37, 53, 8), (37, 53, 16), (37, 53, 96), (53, 37, 40)):
        mask = torch.randint(0, 30, (h, w), generator=gen)
        full = resize_mask(mask, (side, side), align_corners)
        sampled = sampled_by_resize(mask, (side, side), align_corners)
        assert set(sampled.unique().tolist()) == set(full.unique().tolist())
        assert sampled.numel() <= min(full.numel(), mask.numel())


def test_train_and_eval_transforms_apply_the_tag_rule():
    image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    mask = torch.full((32, 32), 2, dtype=torch.int64)
    sample = {"image": image, "mask": mask, "labels": torch.tensor([1.0, 0, 1]), "name": "x", "size": (32, 32)}
    rule = TagRule("from_mask", "resized")
    out = TrainTransform(16, 8, 8, 4, _aug(), tags=rule)(sample)
    assert out["labels"].tolist() == [0, 0, 1]
    assert TrainTransform(16, 8, 8, 4, _aug())(sample)["labels"].tolist() == [1, 0, 1]
    assert EvalTransform(16, tags=rule)(sample)["labels"].tolist() == [0, 0, 1]


# ----------------------------------------------------------------------------- 4: colour jitter
def test_authors_jitter_is_unclipped_and_brightness_is_on_the_255_scale():
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    only_bright = _aug(contrast=[1.0, 1.0], saturation=[1.0, 1.0], hue=0.0, jitter_space="authors")
    delta = color_jitter(image, only_bright) - image
    assert delta.abs().max() <= 0.2 / 255 + 1e-7 and delta.std() < 1e-6  # one tiny additive shift
    clamped = color_jitter(image, _aug(contrast=[1.0, 1.0], saturation=[1.0, 1.0], hue=0.0))
    assert (clamped - image).abs().max() > 1e-3 or clamped.max() == 1  # vitpcm: +-0.2 on [0, 1]
    strong = _aug(brightness=0.0, contrast=[3.0, 3.0], saturation=[1.0, 1.0], hue=0.0)
    assert color_jitter(image, SimpleNamespace(**{**vars(strong), "jitter_space": "authors"})).min() < 0
    assert color_jitter(image, strong).min() >= 0 and color_jitter(image, strong).max() <= 1


def test_authors_contrast_uses_each_channels_own_mean():
    image = torch.stack([torch.full((4, 4), 0.2), torch.full((4, 4), 0.8), torch.linspace(0, 1, 16).reshape(4, 4)])
    aug = _aug(brightness=0.0, contrast=[2.0, 2.0], saturation=[1.0, 1.0], hue=0.0, jitter_space="authors")
    out = color_jitter(image, aug)
    assert torch.allclose(out[0], image[0]) and torch.allclose(out[1], image[1])  # flat channels keep their value
    assert torch.allclose(out[2], (image[2] - image[2].mean()) * 2 + image[2].mean())


def test_tf_hsv_round_trip_and_known_values():
    torch.manual_seed(1)
    x = torch.rand(3, 8, 8)
    assert torch.allclose(_tf_hsv_to_rgb(*_tf_rgb_to_hsv(x)), x, atol=1e-6)
    red = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    h, s, v = _tf_rgb_to_hsv(red)
    assert torch.allclose(_tf_hsv_to_rgb(h + 1 / 3, s, v), torch.tensor([0.0, 1.0, 0.0])[:, None, None], atol=1e-6)
    assert torch.allclose(_tf_hsv_to_rgb(h, s * 0, v), torch.ones(3, 1, 1))  # s = 0: every channel = max
    neg = torch.tensor([-0.5, -0.2, -0.1])[:, None, None]  # TF: v <= 0 gives s = 0
    assert _tf_rgb_to_hsv(neg)[1].item() == 0


def _hsv_to_rgb_reference(h, s, v):
    """TF's kernel as written: a switch on the sextant int(6 h), all channels 0 outside 0..5."""
    c, dh = s * v, h * 6
    category, x, z = dh.to(torch.int64), c * (1 - (torch.remainder(dh, 2.0) - 1).abs()), torch.zeros_like(c)
    table = {0: (c, x, z), 1: (x, c, z), 2: (z, c, x), 3: (z, x, c), 4: (x, z, c), 5: (c, z, x)}
    out = [z.clone(), z.clone(), z.clone()]
    for k, channels in table.items():
        for i in range(3):
            out[i] = torch.where(category == k, channels[i], out[i])
    return torch.stack(out) + (v - c)


def test_tf_hsv_to_rgb_equals_the_kernels_switch_exactly():
    torch.manual_seed(2)
    image = torch.rand(3, 40, 40) * 1.6 - 0.3  # the authors' space leaves [0, 1]
    h, s, v = _tf_rgb_to_hsv(image)
    odd = h.clone()
    odd[0, :3] = torch.tensor([1.0, -0.2, 1.3])  # sextants outside 0..5
    for hue in (h, odd, torch.remainder(h + 0.37, 1.0)):
        assert torch.equal(_tf_hsv_to_rgb(hue, s, v), _hsv_to_rgb_reference(hue, s, v))


def test_saturation_and_hue_in_one_round_trip_match_tf_two():
    torch.manual_seed(3)
    for _ in range(10):
        image = torch.rand(3, 24, 24) * 1.4 - 0.2
        sat, hue = float(torch.empty(()).uniform_(0.5, 1.5)), float(torch.empty(()).uniform_(-0.1, 0.1))
        h, s, v = _tf_rgb_to_hsv(image)  # TF: adjust_saturation, then adjust_hue, each a round trip
        two = _hsv_to_rgb_reference(h, (s * sat).clamp(0, 1), v)
        h, s, v = _tf_rgb_to_hsv(two)
        two = _hsv_to_rgb_reference(torch.remainder(h + hue, 1.0), s, v)
        assert (jitter_authors_with(image, saturation=sat, hue=hue) - two).abs().max() < 5e-6


# ----------------------------------------------------------------------------- 6: align_corners
def test_align_corners_resize_pins_the_corners():
    image = torch.rand(3, 5, 7)
    up = resize_image(image, (9, 13), align_corners=True)
    for i, j in ((0, 0), (-1, -1), (0, -1), (-1, 0)):
        assert torch.allclose(up[:, i, j], image[:, i, j])
    assert not torch.allclose(resize_image(image, (9, 13)), up)  # vitpcm: pixel centres


def test_map_to_et_grid_align_corners():
    grid = torch.arange(16.0).reshape(1, 1, 4, 4)
    no = torch.zeros(1, 3, dtype=torch.bool)
    box = torch.tensor([[0, 0, 32, 32]])
    out = map_to_et_grid(grid, no, box, no, 8, 3, align_corners=True)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, -1, -1] == 15
    assert map_to_et_grid(grid, no, box, no, 8, 3)[0, 0, 0, 0] > 0


def test_cli_prepare_coco_gt_authors(coco, tmp_path, monkeypatch, capsys):
    from vitpcm.cli import main

    monkeypatch.setattr(coco_module, "AUTHORS_MIN_SIDE", 0)
    root = tmp_path / "coco"
    shutil.copytree(coco, root)
    assert main(["prepare", "coco", "--root", str(root), "--gt", "authors", "--workers", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "train2014: 3 masks written" in out and "1 single-valued left out" in out
    assert (root / "masks" / "gt.txt").read_text().strip() == "authors"
