"""The ET view: flips, tiling and the patch-level mapping agree with the pixel-level views."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from vitpcm.config import AugmentConfig
from vitpcm.data.transforms import (
    EvalTransform,
    TrainTransform,
    apply_flips,
    from_model_input,
    invert_flips,
    map_to_et_grid,
    tile_views,
    to_model_input,
    untile_grid,
)


@pytest.mark.parametrize("flips", [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
def test_invert_flips_undoes_apply(flips):
    x = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4).float()
    y = apply_flips(x, flips)
    assert torch.equal(invert_flips(y, flips), x)
    if any(flips):
        assert not torch.equal(y, x)


@pytest.mark.parametrize("b", [1, 3, 4, 5, 8])
def test_tile_then_untile_returns_each_view(b):
    views = torch.randn(b, 3, 8, 8)
    tiled, count = tile_views(views)
    assert tiled.shape == (-(-b // 4), 3, 16, 16)
    assert count == b
    # view 4t+1 sits top-right, 4t+2 bottom-left
    assert torch.equal(tiled[0, :, :8, :8], views[0])
    if b > 1:
        assert torch.equal(tiled[0, :, :8, 8:], views[1])
    if b > 2:
        assert torch.equal(tiled[0, :, 8:, :8], views[2])
    assert torch.equal(untile_grid(tiled, count), views)


def _pixel_view(image, flips, box, et_flips, scale):
    """The ET view made at pixel level from view 1 (undo its flips, crop, resize, flip)."""
    x = invert_flips(image, flips)[:, box[0] : box[2], box[1] : box[3]]
    if x.shape[-1] != scale:
        x = F.interpolate(x[None], size=(scale, scale), mode="bilinear", align_corners=False)[0]
    return apply_flips(x, et_flips)


@pytest.mark.parametrize("seed", range(6))
def test_patch_mapping_matches_pixel_transform_for_crops(seed):
    """Patch-constant image: crop (no resize) + flips at pixel level == the patch-level map."""
    gen = torch.Generator().manual_seed(seed)
    d, g = 4, 6
    grid = torch.rand(1, 3, g, g, generator=gen)
    image = grid[0].repeat_interleave(d, 1).repeat_interleave(d, 2)  # [3, 24, 24]
    flips = torch.rand(1, 3, generator=gen) < 0.5
    et_flips = torch.rand(1, 3, generator=gen) < 0.5
    top, left = (int(v) * d for v in torch.randint(0, 3, (2,), generator=gen))
    box = torch.tensor([[top, left, top + 3 * d, left + 3 * d]])
    view1 = apply_flips(image, flips[0])
    grid1 = apply_flips(grid[0], flips[0])[None]  # predictions live on view 1's grid
    pixel = _pixel_view(view1, flips[0], box[0].tolist(), et_flips[0], 3 * d)
    mapped = map_to_et_grid(grid1, flips, box, et_flips, patch_size=d, et_grid=3)
    assert torch.allclose(F.avg_pool2d(pixel[None], d)[0], mapped[0], atol=1e-6)


def test_patch_mapping_matches_pixel_transform_for_whole_image_halving():
    """No crop: the whole image is halved; 2 x 2 patch averages equal the halved image's patches."""
    gen = torch.Generator().manual_seed(7)
    d, g = 4, 8
    grid = torch.rand(1, 2, g, g, generator=gen)
    image = grid[0].repeat_interleave(d, 1).repeat_interleave(d, 2)
    flips = torch.tensor([[True, False, True]])
    et_flips = torch.tensor([[False, True, True]])
    box = torch.tensor([[0, 0, g * d, g * d]])
    view1 = apply_flips(image, flips[0])
    grid1 = apply_flips(grid[0], flips[0])[None]
    pixel = _pixel_view(view1, flips[0], box[0].tolist(), et_flips[0], g * d // 2)
    mapped = map_to_et_grid(grid1, flips, box, et_flips, patch_size=d, et_grid=g // 2)
    assert torch.allclose(F.avg_pool2d(pixel[None], d)[0], mapped[0], atol=1e-5)


def test_train_transform_outputs_consistent_records():
    aug = OmegaConf.structured(AugmentConfig(crop=1.0))
    t = TrainTransform(size=32, et_crop=16, et_scale=16, patch_size=8, aug=aug)
    torch.manual_seed(0)
    sample = {"image": torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8), "labels": torch.ones(3),
              "name": "x", "size": (40, 50)}  # fmt: skip
    out = t(sample)
    assert out["image"].shape == (3, 32, 32) and out["image_et"].shape == (3, 16, 16)
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    top, left, bottom, right = out["et_box"].tolist()
    assert bottom - top == 16 and right - left == 16 and top % 8 == 0 and left % 8 == 0
    assert out["flips"].dtype == torch.bool and out["et_flips"].shape == (3,)


def test_train_transform_view_matches_pixel_recipe_without_colour():
    """With colour jitter off, image_et is exactly the ET recipe applied to view 1."""
    aug = OmegaConf.structured(AugmentConfig(crop=1.0, brightness=0.0, contrast=[1.0, 1.0],
                                             saturation=[1.0, 1.0], hue=0.0, grayscale=0.0))  # fmt: skip
    t = TrainTransform(size=32, et_crop=16, et_scale=16, patch_size=8, aug=aug)
    for seed in range(5):
        torch.manual_seed(seed)
        img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
        out = t({"image": img, "labels": torch.ones(2), "name": "x", "size": (32, 32)})
        view1 = (out["image"] + 1) / 2
        expected = _pixel_view(view1, out["flips"], out["et_box"].tolist(), out["et_flips"], 16)
        assert torch.allclose((out["image_et"] + 1) / 2, expected, atol=1e-5)


def test_default_normalisation_is_bit_identical_to_the_former_minus_one_to_one():
    """mean = std = 0.5 (the authors' ViT, the synthetic preset) gives exactly x * 2 - 1."""
    torch.manual_seed(0)
    x = torch.rand(3, 64, 64)
    x[:, :4, :4] = torch.rand(3, 4, 4) * 1e-20  # tiny values round too
    assert torch.equal(to_model_input(x), x * 2.0 - 1.0)
    u = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(to_model_input(u), u.float() / 255.0 * 2.0 - 1.0)
    assert torch.allclose(from_model_input(to_model_input(x)), x, atol=1e-7)


def test_backbone_normalisation_reaches_every_transform():
    """CLIP's mean/std: (x - mean) / std per channel, in EvalTransform and both training views."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    expected = (img.float() / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(to_model_input(img, mean, std), expected, atol=1e-6)
    out = EvalTransform(16, mean=mean, std=std)({"image": img, "name": "x"})
    assert torch.allclose(out["image"], expected, atol=1e-6)
    aug = OmegaConf.structured(AugmentConfig(crop=1.0, brightness=0.0, contrast=[1.0, 1.0], saturation=[1.0, 1.0],
                                             hue=0.0, grayscale=0.0, flip_lr=0.0, flip_ud=0.0, transpose=0.0))  # fmt: skip
    t = TrainTransform(size=16, et_crop=8, et_scale=8, patch_size=8, aug=aug, mean=mean, std=std)
    out = t({"image": img, "labels": torch.ones(2), "name": "x", "size": (16, 16)})
    assert torch.allclose(out["image"], expected, atol=1e-6)
    rgb_et = from_model_input(out["image_et"], mean, std)  # back on [0, 1]
    assert rgb_et.min() > -1e-5 and rgb_et.max() < 1 + 1e-5
    with pytest.raises(ValueError, match="3 values"):
        to_model_input(img, (0.5, 0.5), std)
