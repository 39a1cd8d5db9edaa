"""vitpcm: ViT-PCM weakly supervised semantic segmentation in PyTorch.

The small public API::

    import vitpcm
    model = vitpcm.ViTPCM("vit_base_patch16_384", num_classes=21, pretrained=True)
    out = model(images)                      # probs [B, C, h, w], pooled [B, C]
    loss = vitpcm.mce_loss(out["pooled"], tags)
    masks = vitpcm.merge_class_labels(out["probs"], tags).argmax(1)

    cfg = vitpcm.load_config("synthetic", ["data.root=/data/shapes"])
    vitpcm.train(cfg, "runs/shapes")                 # the stages: config / run in, summary dict out
    vitpcm.infer("runs/shapes", split="val", crf=True)
    records = vitpcm.predict("runs/shapes", ["new_photos/"])   # masks for untagged images
    vitpcm.report("runs/shapes")

Names are imported on first use (PEP 562), so ``import vitpcm`` (and the CLI's light
commands, ``vitpcm crf`` / ``vitpcm evaluate``) do not pay for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: Dict[str, str] = {
    # models and losses
    "ViTPCM": "vitpcm.models.vitpcm",
    "merge_class_labels": "vitpcm.models.vitpcm",
    "create_model": "vitpcm.models.registry",
    "mce_loss": "vitpcm.losses",
    "et_loss": "vitpcm.losses",
    "reg_loss": "vitpcm.losses",
    "et_targets": "vitpcm.tasks.pcm",
    # config, runs, errors
    "load_config": "vitpcm.config",
    "prepare_config": "vitpcm.stages.config",  # load + resolve against the backbone + check, once
    "RunLayout": "vitpcm.runs",
    "load_run": "vitpcm.stages.load",
    "VitpcmError": "vitpcm.errors",
    # evaluation
    "ConfusionMatrix": "vitpcm.evaluation",
    "evaluate_folder": "vitpcm.evaluation",
    "evaluate_folders": "vitpcm.evaluation",
    # the stages
    "train": "vitpcm.stages.train",
    "infer": "vitpcm.stages.infer",
    "predict": "vitpcm.stages.predict",
    "run_inference": "vitpcm.stages.infer",  # the name of `infer` before the stages existed
    "refine": "vitpcm.stages.refine",
    "evaluate": "vitpcm.stages.evaluate",
    "report": "vitpcm.stages.report",
    "demo": "vitpcm.stages.demo",
}
_SUBMODULES = ("theory",)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"vitpcm.{name}")
    else:
        raise AttributeError(f"module 'vitpcm' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted([*globals(), *__all__])
