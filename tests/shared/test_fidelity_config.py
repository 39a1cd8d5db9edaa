"""Fidelity switches in the config (docs/reproduce.md): the paper presets carry the authors'
behaviour, the synthetic preset and the library defaults keep vitpcm's, and
train.global_batch turns into a per-process batch and gradient accumulation."""

import pytest

from vitpcm.config import batch_plan, load_config
from vitpcm.errors import VitpcmError

AUTHORS = {
    "model.backbone_dropout": 0.1,
    "model.lstm_dropout": 0.2,
    "train.global_batch": 64,
    "augment.jitter_space": "authors",
    "data.background_tag": "from_mask",
    "data.tags_from": "resized",
    "input.align_corners": True,
    "train.amp": False,
    "crf.gaussian": "lattice",
}
VITPCM = {
    "model.backbone_dropout": 0.0,
    "model.lstm_dropout": 0.0,
    "train.global_batch": 0,
    "augment.jitter_space": "clamped",
    "data.background_tag": "always",
    "data.tags_from": "original",
    "input.align_corners": False,
    "data.coco_gt": "vitpcm",
    "crf.gaussian": "exact",
}


def _values(cfg, keys):
    from omegaconf import OmegaConf

    return {k: OmegaConf.select(cfg, k) for k in keys}


@pytest.mark.parametrize("preset", ["voc12", "coco14"])
def test_paper_presets_switch_every_difference_to_the_authors(preset):
    cfg = load_config(preset)
    assert _values(cfg, AUTHORS) == AUTHORS
    assert cfg.data.coco_gt == ("authors" if preset == "coco14" else "vitpcm")


def test_synthetic_preset_and_defaults_keep_vitpcm_behaviour():
    assert _values(load_config("synthetic"), VITPCM) == VITPCM
    assert _values(load_config(), VITPCM) == VITPCM


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.background_tag=never", "data.background_tag must be always or from_mask"),
        ("data.tags_from=file", "data.tags_from must be original or resized"),
        ("data.coco_gt=theirs", "data.coco_gt must be vitpcm or authors"),
        ("augment.jitter_space=255", "augment.jitter_space must be clamped or authors"),
        ("model.backbone_dropout=1.0", r"model.backbone_dropout must lie in \[0, 1\)"),
        ("model.lstm_dropout=-0.1", r"model.lstm_dropout must lie in \[0, 1\)"),
        ("train.global_batch=-1", "train.global_batch must be >= 0"),
        ("crf.gaussian=fast", "crf.gaussian must be exact or lattice"),
    ],
)
def test_bad_switch_values_are_refused(override, match):
    with pytest.raises(VitpcmError, match=match):
        load_config("synthetic", [override])


@pytest.mark.parametrize(
    "global_batch, world, cap, plan",
    [
        (64, 1, 16, (16, 4)),  # one GPU: 16 per step, 4 steps accumulated = the authors' 4 x 16
        (64, 4, 16, (16, 1)),  # their 4 GPUs
        (64, 2, 12, (8, 4)),  # 32 per process in the fewest equal batches of at most 12
        (64, 8, 16, (8, 1)),
        (64, 1, 64, (64, 1)),
        (0, 3, 16, (16, 1)),  # no global batch: batch_size per process, no accumulation
        (7, 1, 4, (1, 7)),  # a prime share: batches of 1
    ],
)
def test_batch_plan_arithmetic(global_batch, world, cap, plan):
    assert batch_plan(global_batch, world, cap) == plan
    batch, accumulate = plan
    if global_batch:
        assert batch * world * accumulate == global_batch and batch <= cap


def test_batch_plan_needs_a_multiple_of_the_world_size():
    with pytest.raises(VitpcmError, match="not a multiple of the 3 processes: use 63 or 66"):
        batch_plan(64, 3, 16)


def test_pcm_task_takes_its_batch_and_accumulation_from_the_plan(monkeypatch):
    from vitpcm.tasks.pcm import PcmTask, train_settings

    cfg = load_config("synthetic", ["train.global_batch=64", "train.batch_size=16"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_settings(cfg).batch_size == 16 and PcmTask(cfg).accumulate_steps() == 4
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun with 4 processes
    assert train_settings(cfg).batch_size == 16 and PcmTask(cfg).accumulate_steps() == 1
    plain = load_config("synthetic", ["train.batch_size=12"])
    assert train_settings(plain).batch_size == 12 and PcmTask(plain).accumulate_steps() == 1
