"""Stage ``import-keras``: the authors' released Keras weights -> a vitpcm run folder.

``vitpcm import-keras WEIGHTS.h5 --config voc12|coco14 [key=value ...] --out RUN`` writes::

    RUN/config.yaml            the preset + overrides, with model.pretrained=false and the
                               authors' normalisation (input.mean/std 0.5: (x - 127.5) / 127.5)
    RUN/classes.txt            the class list (data.classes of the config)
    RUN/checkpoints/best.pt    the converted model (epoch 0), ``source`` = the .h5 and its SHA-256
    RUN/checkpoints/last.pt    the same

so that ``vitpcm infer RUN``, ``vitpcm report RUN`` and ``vitpcm.load_run(RUN)`` use it as
they use a trained run. The conversion itself is :mod:`vitpcm.models.keras_import`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf

from vitpcm.atomic import write_text_atomic
from vitpcm.classes import VOC_CLASSES, class_list
from vitpcm.config import load_config, to_yaml
from vitpcm.engine.checkpoint import save_checkpoint
from vitpcm.errors import VitpcmError
from vitpcm.models.keras_import import file_sha256, keras_spec, load_keras_weights, published_bpm, read_keras_h5
from vitpcm.models.registry import build_model, model_arch
from vitpcm.runs import RunLayout
from vitpcm.stages.config import prepare_config

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: What an imported run always gets (user overrides come after and win): no timm download,
#: and the input normalisation the authors' ViT was trained with.
IMPORT_OVERRIDES = ["model.pretrained=false", "input.mean=[0.5,0.5,0.5]", "input.std=[0.5,0.5,0.5]"]


def _classes(cfg: Any) -> List[str]:
    """The run's class list: ``data.classes`` (a file or voc12 / coco14); VOC's 21 by default."""
    spec = cfg.data.classes
    if spec:
        return class_list(spec)
    if cfg.data.format == "voc":
        return list(VOC_CLASSES)
    raise VitpcmError(f"data.format={cfg.data.format} needs data.classes (a file, or voc12 / coco14) to import weights")


def _tf_resize_overrides(cfg: Any) -> List[str]:
    """``model.pos_embed_resize=tf`` where this vitpcm has that key (the authors' resize)."""
    return ["model.pos_embed_resize=tf"] if "pos_embed_resize" in cfg.model else []


def import_keras(
    weights_h5: PathLike,
    config: Union[str, Path] = "voc12",
    overrides: Sequence[str] = (),
    out: Optional[PathLike] = None,
    *,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Convert the authors' Keras ``.h5`` weights into a run folder (module docstring).

    Args:
        weights_h5: the released file (ViT-PCM/S or /B, VOC or COCO), or any ``.h5`` that
            the authors' code wrote with ``ModelCheckpoint(save_weights_only=True)``.
        config: preset name or YAML path (``voc12`` / ``coco14``: the data and inference
            settings the run will use; ``model.*`` must match the file's sizes).
        overrides: ``key=value`` strings, e.g. ``model.backbone=vit_small_patch16_384`` for
            /S weights, ``data.root=...``.
        out: the run folder to write (required).
        overwrite: replace the checkpoints of an existing run folder.

    Returns a summary dict: ``run``, ``checkpoint``, ``weights``, ``sha256``, ``backbone``,
    ``classes`` (count), ``tensors``, ``parameters``, ``spec`` (sizes read from the file),
    ``pos_embed_resize``, ``published`` (the authors' BPM mIoU for this file, or None),
    ``seconds``.

    Raises :class:`VitpcmError` for a missing or foreign file, sizes or a class count that
    do not fit the config (one line with the fix), tensors missing or left over (listed),
    or an existing run without ``overwrite``.
    """
    if out is None:
        raise VitpcmError("import-keras needs --out RUN: the run folder to write")
    start = time.time()
    path = Path(weights_h5)
    layout = RunLayout(out)
    if not overwrite and (layout.checkpoint("best").exists() or layout.checkpoint("last").exists()):
        raise VitpcmError(f"{layout.root} already holds checkpoints: choose another --out or pass --overwrite")
    weights = read_keras_h5(path)
    spec = keras_spec(weights)

    base = load_config(config, [*IMPORT_OVERRIDES, *overrides])
    # the one config path: mean / std resolved for the backbone, sizes checked against its patch
    cfg = prepare_config(config, [*IMPORT_OVERRIDES, *_tf_resize_overrides(base), *overrides]).cfg
    classes = _classes(cfg)
    hint = f"--config {config}" + (f" with {' '.join(overrides)}" if overrides else "")
    if len(classes) != spec.num_classes:
        raise VitpcmError(
            f"{path.name} holds {spec.num_classes} classes but {hint} gives {len(classes)} (data.classes):"
            " use the config of the dataset the weights were trained on (voc12: 21, coco14: 81)"
        )
    model = build_model(cfg, len(classes))
    loaded = load_keras_weights(model, weights, hint)
    model.eval()

    arch = model_arch(model, "vitpcm")
    resize = str(arch.get("pos_embed_resize", "timm"))
    if resize != "tf":
        log.warning(
            "this vitpcm resamples position embeddings with timm's bicubic: away from 384 the"
            " predictions differ slightly from the authors' (model.pos_embed_resize=tf is not wired yet)"
        )
    digest = file_sha256(path)
    state = {
        "arch": arch,
        "model": model.state_dict(),
        "epoch": 0,
        "classes": classes,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "source": {
            "keras_h5": str(path.resolve()),
            "sha256": digest,
            "keras": loaded["keras"],
            "spec": loaded["spec"],
            "imported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }
    layout.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.config, to_yaml(cfg))
    write_text_atomic(layout.classes, "\n".join(classes) + "\n")
    with torch.no_grad():
        save_checkpoint(layout.checkpoint("last"), state)
    _same_file(layout.checkpoint("last"), layout.checkpoint("best"))
    return {
        "run": str(layout.root),
        "checkpoint": str(layout.checkpoint("best")),
        "weights": str(path),
        "sha256": digest,
        "backbone": str(cfg.model.backbone),
        "classes": len(classes),
        "tensors": loaded["tensors"],
        "parameters": loaded["parameters"],
        "spec": loaded["spec"],
        "pos_embed_resize": resize,
        "published": published_bpm(spec),
        "seconds": round(time.time() - start, 2),
    }


def _same_file(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a /B checkpoint is 350 MB), a copy where links fail.
    Training replaces checkpoints by rename, so a later write to one never changes the other."""
    tmp = dst.with_name(dst.name + ".link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
