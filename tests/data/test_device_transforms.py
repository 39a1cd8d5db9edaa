"""data.transforms_on=device (issue 11): the loader only decodes and draws, the pixels are
made a batch at a time on the model's device; on the CPU the result is bit for bit the
image-by-image recipe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from vitpcm.config import AugmentConfig, load_config
from vitpcm.data.jitter import apply_jitter, apply_jitter_batch, draw_jitter
from vitpcm.data.transforms import (
    EvalTransform,
    MultiScaleTransform,
    TrainTransform,
    apply_flips,
    collate,
    resize_image,
    to_model_input,
    transforms_on_device,
)
from vitpcm.errors import VitpcmError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)


def _aug(space: str):
    return OmegaConf.structured(AugmentConfig(jitter_space=space, grayscale=0.5, crop=0.5))


def _sample(seed: int) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    h, w = 50 + 3 * (seed % 3), 70 - 2 * (seed % 3)  # three sizes: the device path resizes each size as a batch
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    return {"image": image, "labels": torch.zeros(4), "name": str(seed), "size": (h, w)}


def _recipe(t: TrainTransform, sample: dict) -> dict:
    """The image-by-image recipe as it was written before the draws were split off."""
    n, s, ac = t.size, t.et_scale, t.align_corners
    base = resize_image(sample["image"], (n, n), ac)
    flips = torch.rand(3) < torch.tensor([t.aug.flip_lr, t.aug.flip_ud, t.aug.transpose])
    view = apply_flips(apply_jitter(base, draw_jitter(t.aug), t.space), flips)
    et = apply_jitter(base, draw_jitter(t.aug), t.space)
    if torch.rand(()) < t.aug.crop:
        starts = torch.arange(0, n - t.et_crop + 1, t.patch)
        top, left = (int(starts[torch.randint(len(starts), ())]) for _ in range(2))
        et = et[:, top : top + t.et_crop, left : left + t.et_crop]
    shrink = et.shape[-1] > s and not ac
    et = F.interpolate(et[None], size=(s, s), mode="bilinear", align_corners=ac, antialias=shrink)[0]
    et = et.clamp(0, 1) if t.clamp else et
    et = apply_flips(et, torch.rand(3) < torch.tensor([t.aug.flip_lr, t.aug.flip_ud, t.aug.transpose]))
    return {"image": to_model_input(view, MEAN, STD), "image_et": to_model_input(et, MEAN, STD)}


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("space", ["clamped", "authors"])
def test_a_deferred_batch_is_bit_identical_to_the_image_by_image_recipe(space, align_corners):
    loader = TrainTransform(64, 32, 32, 16, _aug(space), mean=MEAN, std=STD, align_corners=align_corners)
    deferred = TrainTransform(64, 32, 32, 16, _aug(space), mean=MEAN, std=STD, align_corners=align_corners,
                              defer=True)  # fmt: skip
    plans, singles, recipes = [], [], []
    for seed in range(12):
        torch.manual_seed(seed)
        plans.append(deferred(_sample(seed)))
        torch.manual_seed(seed)
        singles.append(loader(_sample(seed)))
        torch.manual_seed(seed)
        recipes.append(_recipe(loader, _sample(seed)))
    assert {"image_raw", "jitter", "jitter_et"} <= set(plans[0]) and "image" not in plans[0]
    assert plans[0]["image_raw"].dtype == torch.uint8  # the workers ship the decoded image
    batch = deferred.finish(collate(plans))
    assert not {"image_raw", "jitter", "jitter_et"} & set(batch)
    crops = sum(int(p["et_box"][2] - p["et_box"][0]) == 32 for p in plans)
    assert 0 < crops < 12  # both ET kinds (crop and whole image) are in the batch
    for i in range(12):
        for key in ("image", "image_et"):
            assert torch.equal(batch[key][i], singles[i][key]), (key, i)
            assert torch.equal(singles[i][key], recipes[i][key]), (key, i)
        for key in ("flips", "et_box", "et_flips", "labels"):
            assert torch.equal(batch[key][i], singles[i][key])
    assert deferred.finish(batch) is batch  # a finished batch passes through


def test_batched_authors_jitter_mixes_grey_and_colour_images():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    aug = _aug("authors")
    aug.grayscale = 0.5
    draws = [draw_jitter(aug) for _ in range(6)]
    assert len({d.grey for d in draws}) == 2
    out = apply_jitter_batch(images, draws, "authors")
    for image, d, o in zip(images, draws, out):
        assert torch.equal(o, apply_jitter(image, d, "authors"))
        assert d.grey == bool(torch.equal(o[0], o[1]))


@pytest.mark.parametrize("tta", [False, True])
def test_deferred_eval_transforms_make_the_loader_inputs(tta):
    make = (lambda d: MultiScaleTransform([32, 48], MEAN, STD, defer=d)) if tta else (
        lambda d: EvalTransform(32, MEAN, STD, defer=d))  # fmt: skip
    samples = [_sample(seed) for seed in range(3)]
    loaded = collate([make(False)(dict(s)) for s in samples])
    deferred = collate([make(True)(dict(s)) for s in samples])
    assert "image_raw" in deferred and not any(k.startswith("image_") and k != "image_raw" for k in deferred)
    finished = make(True).finish(deferred, torch.device("cpu"))
    keys = ["image_32", "image_48"] if tta else ["image"]
    for key in keys:
        assert torch.equal(finished[key], loaded[key])
    assert "image_raw" not in finished


def test_transforms_on_resolves_per_device_and_bad_values_are_refused():
    cfg = load_config("synthetic", [])
    assert cfg.data.transforms_on == "auto"
    assert not transforms_on_device(cfg, "cpu") and transforms_on_device(cfg, "cuda")
    assert transforms_on_device(load_config("synthetic", ["data.transforms_on=device"]), "cpu")
    assert not transforms_on_device(load_config("synthetic", ["data.transforms_on=loader"]), "cuda")
    with pytest.raises(VitpcmError, match="data.transforms_on must be auto or loader or device"):
        load_config("synthetic", ["data.transforms_on=gpu"])


@pytest.mark.parametrize("space", ["clamped", "authors"])
def test_the_device_path_makes_every_tensor_on_the_device(space):
    """No GPU here: PyTorch's meta device stands in for one. A step that mixes in a CPU
    tensor (a normalisation constant, a lookup table) raises there as it would on CUDA."""
    meta = torch.device("meta")
    train = TrainTransform(64, 32, 32, 16, _aug(space), mean=MEAN, std=STD, defer=True)
    torch.manual_seed(0)
    batch = train.finish(collate([train(_sample(seed)) for seed in range(6)]), meta)
    assert batch["image"].device == meta and batch["image"].shape == (6, 3, 64, 64)
    assert batch["image_et"].device == meta and batch["image_et"].shape == (6, 3, 32, 32)
    for make in (lambda: EvalTransform(32, MEAN, STD, defer=True), lambda: MultiScaleTransform([32, 48], defer=True)):
        t = make()
        out = t.finish(collate([t(_sample(seed)) for seed in range(3)]), meta)
        assert all(v.device == meta for k, v in out.items() if k.startswith("image"))
