"""timm ViT backbones: creation by name, weights from timm or a local file, freezing.

The backbone is created with ``dynamic_img_size=True``: timm interpolates the position
embeddings to whatever grid the input has, so one model runs at 384 in training and 960
at inference (the paper's settings).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch.nn as nn

from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

Pretrained = Union[bool, str, Path, None]


def create_backbone(
    name: str,
    pretrained: Pretrained = False,
    img_size: Optional[int] = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm VisionTransformer without classification head.

    Args:
        name: a timm ViT name (``vit_base_patch16_384``, ``vit_small_patch16_384``, ...).
        pretrained: ``True`` for timm's weights (needs the hub), ``False`` for random
            init, or a local checkpoint path (``.pth``/``.bin``/``.safetensors`` state
            dict, or the original JAX ``.npz``).
        img_size: nominal input side; position embeddings are sized for it (and
            resampled from the checkpoint when it differs).
        kwargs: passed to ``timm.create_model`` (``patch_size``, ``embed_dim``, ``depth``...).
    """
    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        raise VitpcmError(f"unknown backbone '{name}': give a timm ViT name, e.g. {', '.join(close) or 'vit_base_patch16_384'}")
    args: Dict[str, Any] = dict(num_classes=0, dynamic_img_size=True, **kwargs)
    if img_size is not None:
        args["img_size"] = img_size
    overlay: Dict[str, Any] = {}
    use_weights = bool(pretrained)
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if str(pretrained).lower() in ("true", "false", "none", ""):
            use_weights = str(pretrained).lower() == "true"
        else:
            if not path.is_file():
                raise VitpcmError(f"checkpoint {path} not found: set model.pretrained to a local weight file, true or false")
            overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
    try:
        model = timm.create_model(name, pretrained=use_weights, pretrained_cfg_overlay=overlay or None, **args)
    except VitpcmError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if overlay:
            raise VitpcmError(f"cannot load backbone weights from {overlay['file']} into {name}: {first}") from None
        if use_weights:
            raise VitpcmError(
                f"cannot fetch timm weights for {name} ({first}): without a network, download them elsewhere"
                " and set model.pretrained=/path/to/file, or model.pretrained=false"
            ) from None
        raise VitpcmError(f"cannot create backbone {name}: {first}") from None
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise VitpcmError(f"backbone '{name}' is not a plain ViT (no blocks/patch_embed): choose a vit_* model")
    return model


def patch_size_of(backbone: nn.Module) -> int:
    size = backbone.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def set_trainable(backbone: nn.Module, last_blocks: int) -> None:
    """Freeze the backbone except its last ``last_blocks`` blocks and final norm.

    ``0`` freezes everything (the warm-up phase); ``-1`` (or more than the depth) trains
    the whole backbone, embeddings included.
    """
    depth = len(backbone.blocks)
    if last_blocks < 0 or last_blocks >= depth:
        for p in backbone.parameters():
            p.requires_grad_(True)
        return
    for p in backbone.parameters():
        p.requires_grad_(False)
    if last_blocks == 0:
        return
    for block in backbone.blocks[depth - last_blocks :]:
        for p in block.parameters():
            p.requires_grad_(True)
    for p in backbone.norm.parameters():
        p.requires_grad_(True)
