"""Config presets, overrides and their errors."""

import subprocess
import sys

import pytest

from vitpcm.config import check_sizes, load_config, preset_names
from vitpcm.errors import VitpcmError


def test_presets_exist_and_load():
    assert {"synthetic", "voc12", "coco14"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.input.et_scale * 2 == cfg.input.train_size


def test_voc12_preset_carries_the_authors_recipe():
    cfg = load_config("voc12")
    assert cfg.model.backbone.startswith("vit_base_patch16_384")
    assert (cfg.input.train_size, cfg.infer.scale, cfg.input.et_crop, cfg.input.et_scale) == (384, 960, 128, 192)
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.unfreeze_blocks) == (80, 1, 5)
    assert (cfg.train.warmup_lr, cfg.train.lr, cfg.train.batch_size) == (1e-3, 1e-4, 16)
    assert (cfg.model.lstm_hidden, cfg.model.dropout, cfg.loss.reg_weight) == (192, 0.2, 0.01)
    assert cfg.augment.crop == 0.3 and list(cfg.augment.contrast) == [0.5, 2.0]
    assert (cfg.data.format, cfg.data.train_split, cfg.data.val_split) == ("voc", "trainaug", "val")


def test_coco14_preset_reads_coco():
    cfg = load_config("coco14")
    assert (cfg.data.format, cfg.data.classes, cfg.data.train_split, cfg.data.val_split) == (
        "coco",
        "coco14",
        "train",
        "val",
    )
    assert cfg.augment.crop == 0.0


def test_overrides_apply_with_types():
    cfg = load_config("synthetic", ["train.epochs=3", "model.backbone=vit_small_patch16_384", "loss.et=false"])
    assert cfg.train.epochs == 3 and cfg.model.backbone == "vit_small_patch16_384" and cfg.loss.et is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'.*epochs"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("train.epochs=abc", "bad value for 'train.epochs'"),
        ("train.epochs", "not of the form key=value"),
        ("input.et_scale=100", "half of input.train_size"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(VitpcmError, match=message):
        load_config("synthetic", [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(VitpcmError, match=f"unknown config key 'train.epohcs' in {path}"):
        load_config(path)


def test_mean_std_default_to_auto_and_take_three_numbers():
    cfg = load_config("voc12")
    assert cfg.input.mean == "auto" and cfg.input.std == "auto"
    cfg = load_config("synthetic", ["input.mean=[0.485,0.456,0.406]", "input.std=[0.229,0.224,0.225]"])
    assert list(cfg.input.mean) == [0.485, 0.456, 0.406]


@pytest.mark.parametrize(
    "override, message",
    [
        ("input.mean=0.5", "input.mean must be auto .* or three numbers"),
        ("input.std=[0.5,0.5]", "input.std must be auto"),
        ("input.mean=imagenet", "input.mean must be auto"),
        ("input.std=[0.5,0,0.5]", "input.std must be positive"),
    ],
)
def test_bad_mean_std(override, message):
    with pytest.raises(VitpcmError, match=message):
        load_config("synthetic", [override])


def test_check_sizes_names_the_key_and_nearest_valid_values():
    cfg = load_config("synthetic", ["input.et_crop=44"])
    with pytest.raises(
        VitpcmError,
        match=r"^input.et_crop=44 is not a multiple of the patch size 8 of vit_tiny_patch16_224: use 40 or 48$",
    ):
        check_sizes(cfg, 8)
    check_sizes(load_config("synthetic"), 8)


def test_loading_a_config_imports_neither_torch_nor_timm():
    """`vitpcm crf` / `evaluate` load configs on CPU boxes: load_config must stay light."""
    code = (
        "import sys; from vitpcm.config import load_config; load_config('synthetic', ['model.backbone=vit_small_patch14_dinov2']);"
        "bad = [m for m in ('torch', 'timm') if m in sys.modules]; sys.exit(', '.join(bad) or None)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_run_saved_before_mean_std_keeps_its_minus_one_to_one_inputs(tmp_path):
    """Old run folders: config.yaml without input.mean -> 0.5 / 0.5, as they were trained."""
    from omegaconf import OmegaConf

    from vitpcm.config import load_saved_config, to_yaml

    old = OmegaConf.to_container(load_config("voc12", ["model.backbone=vit_small_patch14_dinov2"]))
    del old["input"]["mean"], old["input"]["std"]
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(old))
    cfg = load_saved_config(path, ["train.epochs=2"])
    assert list(cfg.input.mean) == [0.5] * 3 and list(cfg.input.std) == [0.5] * 3 and cfg.train.epochs == 2
    # A run saved now keeps what it says (auto, or resolved values); overrides still win.
    path.write_text(to_yaml(load_config("voc12")))
    assert load_saved_config(path).input.mean == "auto"
    assert list(load_saved_config(path, ["input.mean=[0.1,0.2,0.3]"]).input.mean) == [0.1, 0.2, 0.3]
