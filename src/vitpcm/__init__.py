"""vitpcm: ViT-PCM weakly supervised semantic segmentation in PyTorch.

The small public API::

    import vitpcm
    model = vitpcm.ViTPCM("vit_base_patch16_384", num_classes=21, pretrained=True)
    out = model(images)                      # probs [B, C, h, w], pooled [B, C]
    loss = vitpcm.mce_loss(out["pooled"], tags)
    masks = vitpcm.merge_class_labels(out["probs"], tags).argmax(1)

    cfg = vitpcm.load_config("synthetic", ["data.root=/data/shapes"])
    vitpcm.train(cfg, "runs/shapes")
    vitpcm.run_inference("runs/shapes", split="val")
"""

from vitpcm import theory
from vitpcm.config import load_config
from vitpcm.engine.infer import run_inference
from vitpcm.engine.train import train
from vitpcm.errors import VitpcmError
from vitpcm.losses import et_loss, et_targets, mce_loss, merge_class_labels, reg_loss
from vitpcm.metrics import ConfusionMatrix, evaluate_folder
from vitpcm.models.vitpcm import ViTPCM

__version__ = "0.1.0"

__all__ = [
    "ViTPCM",
    "ConfusionMatrix",
    "VitpcmError",
    "et_loss",
    "et_targets",
    "evaluate_folder",
    "load_config",
    "mce_loss",
    "merge_class_labels",
    "reg_loss",
    "run_inference",
    "theory",
    "train",
]
