"""What the bench measures on: synthetic data at VOC sizes, the preset's config pointed at
it, a run folder with random weights, no screening cache left behind."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vitpcm.atomic import write_text_atomic
from vitpcm.config import load_config, to_yaml
from vitpcm.data.synthetic import generate
from vitpcm.engine.checkpoint import save_checkpoint
from vitpcm.io import read_names
from vitpcm.models.registry import build_model, model_arch
from vitpcm.runs import RunLayout


def voc_sized(root: Path, names: Sequence[str], sizes: Sequence[Tuple[int, int]]) -> None:
    """Resize the synthetic images (bicubic) and masks (nearest) in place to VOC sizes
    (``sizes``: (W, H), taken in turn)."""
    for i, name in enumerate(names):
        w, h = sizes[i % len(sizes)]
        img = root / "JPEGImages" / f"{name}.jpg"
        Image.open(img).convert("RGB").resize((w, h), Image.BICUBIC).save(img, quality=92)
        mask = root / "SegmentationClass" / f"{name}.png"
        with Image.open(mask) as m:
            m.resize((w, h), Image.NEAREST).save(mask)


def make_bench_data(root: Path, n_train: int, n_val: int, sizes: Optional[Sequence[Tuple[int, int]]]) -> Path:
    """The built-in synthetic set (VOC layout, seed 0) in ``root``, resized to ``sizes``
    (None: the synthetic size). Returns ``root``."""
    generate(root, n_train=n_train, n_val=n_val, seed=0, workers=1, progress=False)
    if sizes:
        seg = root / "ImageSets" / "Segmentation"
        names = read_names(seg / "train.txt") + (read_names(seg / "val.txt") if n_val else [])
        voc_sized(root, names, sizes)
    return root


def bench_config(preset: str, root: Path, device: str, workers: Optional[int], overrides: Sequence[str]) -> DictConfig:
    """The preset with random weights, pointed at the synthetic set (VOC layout) and kept to
    the preset's class list (the synthetic masks use indices 1..5, valid in any list).
    ``workers``: data-loader workers (None: the preset's)."""
    base = [
        "model.pretrained=false",
        "data.format=voc",
        f"data.root={root}",
        "data.train_split=train",
        "data.val_split=val",
        "data.sbd=null",
        "data.tags=null",
        "data.masks=null",
        f"train.device={device}",
        "train.val_every=0",
    ]
    if workers is not None:
        base.append(f"data.num_workers={int(workers)}")
    return load_config(preset, [*base, *overrides])


def write_random_run(cfg: Any, run: Path, num_classes: int, classes: List[str]) -> torch.nn.Module:
    """A run folder holding the config's model with random weights (``best.pt``), as
    ``vitpcm infer`` reads it. Returns the model."""
    model = build_model(cfg, num_classes)
    layout = RunLayout(run)
    layout.checkpoints.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.config, to_yaml(cfg))
    state = {"arch": model_arch(model, "vitpcm"), "classes": classes, "epoch": 0,
             "config": OmegaConf.to_container(cfg, resolve=True), "model": model.state_dict()}  # fmt: skip
    save_checkpoint(layout.checkpoint("best"), state)
    return model


@contextlib.contextmanager
def no_screen_cache() -> Iterator[None]:
    """The bench's throw-away datasets leave nothing in the user's screening cache."""
    old = os.environ.get("VITPCM_CACHE_DIR")
    os.environ["VITPCM_CACHE_DIR"] = "off"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VITPCM_CACHE_DIR", None)
        else:
            os.environ["VITPCM_CACHE_DIR"] = old
