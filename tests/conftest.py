"""Shared fixtures: a tiny synthetic dataset and a tiny model config (fast on a CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitpcm.data.synthetic import generate

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _screening_cache_in_a_temp_folder(tmp_path_factory):
    """Training screens its data through a cache in the user's cache dir: keep the suite's
    entries (and its subprocesses') out of the home folder."""
    import os

    old = os.environ.get("VITPCM_CACHE_DIR")
    os.environ["VITPCM_CACHE_DIR"] = str(tmp_path_factory.mktemp("vitpcm-cache"))
    yield
    if old is None:
        os.environ.pop("VITPCM_CACHE_DIR", None)
    else:
        os.environ["VITPCM_CACHE_DIR"] = old


# A ViT small enough to train for an epoch in about a second; 32 px inputs, 8 px patches.
TINY = [
    "model.backbone=vit_tiny_patch16_224",
    "model.pretrained=false",
    "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "model.lstm_hidden=8",
    "input.train_size=32",
    "input.et_crop=16",
    "input.et_scale=16",
    "infer.scale=32",
    "train.epochs=2",
    "train.warmup_epochs=1",
    "train.unfreeze_blocks=1",
    "train.batch_size=4",
    "train.val_batch_size=4",
    "data.num_workers=0",
]

# A DeepLab small enough for a few steps in about a second (`vitpcm segment`; the demo's chain)
TINY_SEGMENT = [
    "segment.backbone=resnet18",
    "segment.backbone_weights=false",
    "segment.freeze_bn=false",
    "segment.msc_scales=[]",
    "segment.crop=32",
    "segment.batch_size=4",
    "segment.iterations=2",
    "segment.lr=0.01",
]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """12 train + 6 val synthetic images in the VOC layout (read-only for tests)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, n_train=12, n_val=6, seed=3, workers=1, progress=False)
    return root


@pytest.fixture()
def tiny_overrides(synth_root) -> list[str]:
    return [*TINY, f"data.root={synth_root}"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synth_root) -> Path:
    """A tiny trained run (1 epoch) with val pseudo-masks, probabilities and CRF masks."""
    from vitpcm.config import load_config
    from vitpcm.stages.infer import run_inference
    from vitpcm.stages.train import train

    run = tmp_path_factory.mktemp("tinyrun") / "run"
    train(load_config("synthetic", [*TINY, f"data.root={synth_root}", "train.epochs=1"]), run, progress=False)
    run_inference(run, "val", crf=True, overrides=["crf.workers=1"], progress=False)
    return run
