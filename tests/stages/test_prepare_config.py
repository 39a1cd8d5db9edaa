"""The one config path: ``prepare_config`` loads, layers, resolves against the backbone and
checks a config (and the resume rules) once; tasks read the values and build one kind of
engine settings."""

from __future__ import annotations

import dataclasses

import pytest

import vitpcm.stages.config as stage_config
from vitpcm.config import load_config, resolved_normalisation, to_yaml
from vitpcm.errors import VitpcmError
from vitpcm.runs import RunLayout
from vitpcm.stages.config import prepare_config, resolved_config
from vitpcm.tasks.pcm import train_settings
from vitpcm.tasks.segment import segment_settings

HALF = (0.5, 0.5, 0.5)


@pytest.fixture
def described(monkeypatch):
    """The backbones described on the meta device, one entry per description."""
    calls = []
    real = stage_config.describe_configured_backbone

    def counting(cfg):
        calls.append(str(cfg.model.backbone))
        return real(cfg)

    monkeypatch.setattr(stage_config, "describe_configured_backbone", counting)
    return calls


def _saved_run(root) -> RunLayout:
    run = RunLayout(root)
    run.root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(to_yaml(prepare_config("synthetic").cfg))
    return run


def test_a_new_config_is_resolved_and_checked_once(described):
    prepared = prepare_config("synthetic", ["train.epochs=2"])
    assert resolved_normalisation(prepared.cfg) == (HALF, HALF)
    assert prepared.cfg.train.epochs == 2 and prepared.changes == {}
    assert described == ["vit_tiny_patch16_224"]
    # a prepared config goes through again unchanged (what `vitpcm.train(cfg)` does with it)
    assert to_yaml(prepare_config(prepared.cfg).cfg) == to_yaml(prepared.cfg)
    assert to_yaml(resolved_config("synthetic", ["train.epochs=2"])) == to_yaml(prepared.cfg)  # `vitpcm config`


def test_sizes_are_checked_where_the_config_is_prepared():
    with pytest.raises(
        VitpcmError,
        match=r"^infer.scale=961 is not a multiple of the patch size 8 of vit_tiny_patch16_224: use 960 or 968$",
    ):
        prepare_config("synthetic", ["infer.scale=961"])


def test_an_unprepared_config_is_one_line_for_the_tasks():
    with pytest.raises(VitpcmError, match="input.mean / input.std are still auto: prepare the config first"):
        resolved_normalisation(load_config("synthetic"))
    with pytest.raises(VitpcmError, match="a new run needs a config"):
        prepare_config(None)


def test_resume_starts_from_the_runs_config_and_describes_the_backbone_once(tmp_path, described):
    run = _saved_run(tmp_path / "run")
    described.clear()
    prepared = prepare_config(None, ["train.epochs=5"], resume=run.root)
    assert prepared.changes == {"train.epochs": (30, 5)} and prepared.cfg.train.epochs == 5
    assert described == ["vit_tiny_patch16_224"]  # the saved mean / std are numbers: the sizes only
    with pytest.raises(VitpcmError, match=r"^--resume: model.lstm_hidden \(64 -> 16\) cannot change on resume"):
        prepare_config(None, ["model.lstm_hidden=16"], resume=run.root)
    with pytest.raises(VitpcmError, match="leave out the preset on --resume"):
        prepare_config("synthetic", ["model.lstm_hidden=16"], resume=run)


def test_resume_of_a_folder_without_a_run(tmp_path):
    with pytest.raises(VitpcmError, match="holds no run .*nothing to resume"):
        prepare_config(None, resume=tmp_path)
    assert prepare_config("synthetic", resume=tmp_path).changes == {}


def test_a_run_folder_is_a_source(tmp_path):
    run = _saved_run(tmp_path)
    cfg = prepare_config(run, ["infer.scale=64"]).cfg
    assert cfg.infer.scale == 64 and resolved_normalisation(cfg) == (HALF, HALF)


def test_both_tasks_fill_the_engine_settings_alike():
    cfg = prepare_config("synthetic_segment", ["train.seed=7", "train.max_loss=5", "train.checkpoint_every=3"]).cfg
    pcm, seg = dataclasses.asdict(train_settings(cfg)), dataclasses.asdict(segment_settings(cfg, 4))
    own = {"epochs", "batch_size", "val_every"}
    assert {k: v for k, v in pcm.items() if k not in own} == {k: v for k, v in seg.items() if k not in own}
    assert (pcm["seed"], pcm["max_loss"], pcm["checkpoint_every"]) == (7, 5.0, 3)
    assert (seg["epochs"], seg["batch_size"], seg["val_every"]) == (4, cfg.segment.batch_size, cfg.segment.val_every)
    assert (pcm["epochs"], pcm["val_every"]) == (cfg.train.epochs, cfg.train.val_every)
