"""Backbones as adapters: what ViT-PCM needs from a timm vision transformer, in one place.

ViT-PCM asks its backbone for six things: the patch size, the prefix tokens to drop (CLS,
DeiT's distillation token, DINOv2's register tokens), the input normalisation its weights
expect, the blocks to unfreeze, the final norm, and the patch tokens on their grid.
:class:`BackboneAdapter` answers them for the timm families that fit (below);
:class:`~vitpcm.models.vitpcm.ViTPCM` calls only the adapter, while the timm module itself
stays registered as ``ViTPCM.backbone`` (state-dict keys ``backbone.*``, so checkpoints
and timm weights load unchanged).

Supported (all created with ``dynamic_img_size=True``: timm interpolates the position
embeddings, or recomputes the rotary ones, for whatever grid the input has, so one model
runs at 384 in training and 960 at inference, the paper's settings):

* timm ``VisionTransformer`` (module ``vision_transformer`` / ``deit``): the original and
  augreg ViTs (``vit_base_patch16_384``, patch 16 or 8), DeiT (``deit_*``, the distilled
  ones with 2 prefix tokens), DINO (``*.dino``), DINOv2 (``*_dinov2``, with or without
  register tokens), CLIP (``vit_*_clip_*``, whose extra pre-norm ``norm_pre`` sits in the
  stem and is trained only with the whole backbone);
* timm ``Eva`` (module ``eva``): EVA-02 (``eva02_*``, rotary position embeddings). Its MIM
  checkpoints keep the encoder's final norm as ``fc_norm`` (timm moves it there); the
  adapter applies that norm to every patch token.

Anything else (CNNs, hybrids, Swin, BEiT, ...) is refused with one line naming what works.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from timm.models import is_model_in_modules
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from vitpcm.config import normalisation_values
from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

Pretrained = Union[bool, str, Path, None]
Triple = Tuple[float, float, float]

SUPPORTED = (
    "timm ViTs (vit_*: original/augreg, DINO, DINOv2 with or without registers, CLIP), "
    "DeiT (deit_*) and EVA-02 (eva02_*)"
)
_TIMM_MODULES = ("vision_transformer", "deit", "eva")  # timm source modules of the classes below
_CLASSES = (VisionTransformer, Eva)  # VisionTransformerDistilled is a VisionTransformer


def _arch(name: str) -> str:
    return name.split(".")[0]


def check_supported(name: str) -> None:
    """Raise a one-line :class:`VitpcmError` unless ``name`` is a timm model of a supported family."""
    arch = _arch(name)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        raise VitpcmError(
            f"unknown backbone '{name}': give a timm ViT name, e.g. {', '.join(close) or 'vit_base_patch16_384'}"
        )
    if not is_model_in_modules(arch, list(_TIMM_MODULES)):
        raise VitpcmError(f"backbone '{name}' is not a supported vision transformer: vitpcm takes {SUPPORTED}")


def timm_create_args(img_size: Optional[int] = None, **kwargs: Any) -> Dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` (headless, dynamic size), kwargs on top."""
    args: Dict[str, Any] = dict(num_classes=0, dynamic_img_size=True, **kwargs)
    if img_size is not None:
        args["img_size"] = img_size
    return args


def create_backbone(
    name: str,
    pretrained: Pretrained = False,
    img_size: Optional[int] = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a headless timm vision transformer of a supported family (module docstring).

    Args:
        name: a timm model name, with or without its pretrained tag
            (``vit_base_patch16_384.orig_in21k_ft_in1k``, ``vit_small_patch14_reg4_dinov2``...).
        pretrained: ``True`` for timm's weights (needs the hub), ``False`` for random
            init, or a local checkpoint path (``.pth``/``.bin``/``.safetensors`` state
            dict, or the original JAX ``.npz``).
        img_size: nominal input side; position embeddings are sized for it (and
            resampled from the checkpoint when it differs).
        kwargs: passed to ``timm.create_model`` (``patch_size``, ``embed_dim``, ``depth``...).

    Returns the timm module; wrap it in :class:`BackboneAdapter` to use it.
    """
    check_supported(name)
    args = timm_create_args(img_size, **kwargs)
    overlay: Dict[str, Any] = {}
    use_weights = bool(pretrained)
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if str(pretrained).lower() in ("true", "false", "none", ""):
            use_weights = str(pretrained).lower() == "true"
        else:
            if not path.is_file():
                raise VitpcmError(
                    f"checkpoint {path} not found: set model.pretrained to a local weight file, true or false"
                )
            overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
    try:
        model = timm.create_model(name, pretrained=use_weights, pretrained_cfg_overlay=overlay or None, **args)
    except VitpcmError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if overlay:
            raise VitpcmError(f"cannot load backbone weights from {overlay['file']} into {name}: {first}") from None
        if use_weights:
            raise VitpcmError(
                f"cannot fetch timm weights for {name} ({first}): without a network, download them elsewhere"
                " and set model.pretrained=/path/to/file, or model.pretrained=false"
            ) from None
        raise VitpcmError(f"cannot create backbone {name}: {first}") from None
    if not isinstance(model, _CLASSES):
        raise VitpcmError(
            f"backbone '{name}' ({type(model).__name__}) is not a supported vision transformer: vitpcm takes {SUPPORTED}"
        )
    _drop_unused(model)
    return model


def _drop_unused(model: nn.Module) -> None:
    """Remove pooling parts the patch path never runs (attention pooling; an fc_norm next to a
    final norm): trainable parameters without gradients would stall DDP. The default ViTs
    have neither, so their state-dict keys are untouched."""
    if getattr(model, "attn_pool", None) is not None:
        model.attn_pool = None
    norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
    if _has_params(norm) and _has_params(fc_norm):
        model.fc_norm = nn.Identity()


def _has_params(module: Optional[nn.Module]) -> bool:
    return module is not None and not isinstance(module, nn.Identity) and any(True for _ in module.parameters())


def _triple(values: Any, default: float) -> Triple:
    vals = tuple(float(v) for v in (values if values is not None else (default,) * 3))
    if len(vals) == 1:
        vals = vals * 3
    return vals  # type: ignore[return-value]


class BackboneAdapter:
    """What ViT-PCM asks of its backbone, answered for one timm module.

    The adapter holds a reference to the module and no parameters of its own (it is not an
    ``nn.Module``), so the model's state dict stays the timm module's under ``backbone.*``.

    Attributes:
        module: the timm module.
        name: the timm name it was created from (for messages).
    """

    def __init__(self, module: nn.Module, name: str = "") -> None:
        if not isinstance(module, _CLASSES):
            raise VitpcmError(
                f"backbone '{name or type(module).__name__}' ({type(module).__name__}) is not a supported"
                f" vision transformer: vitpcm takes {SUPPORTED}"
            )
        if not getattr(module, "dynamic_img_size", False):
            raise VitpcmError(
                f"backbone '{name or type(module).__name__}' was created without dynamic_img_size=True: use create_backbone"
            )
        size = module.patch_embed.patch_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if size[0] != size[1]:
            raise VitpcmError(f"backbone '{name}' has non-square patches {size[0]}x{size[1]}: vitpcm needs square ones")
        self.module = module
        self.name = name or str(getattr(module, "pretrained_cfg", {}).get("architecture", type(module).__name__))
        self._patch = int(size[0])

    # --- geometry -------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        """Side d of a square patch in pixels: inputs must be multiples of it."""
        return self._patch

    @property
    def embed_dim(self) -> int:
        """Token width e."""
        return int(self.module.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: CLS (1), DeiT's distillation token (+1), registers (+R)."""
        return int(self.module.num_prefix_tokens)

    @property
    def num_register_tokens(self) -> int:
        """Register tokens among the prefix tokens (DINOv2 ``reg4``: 4)."""
        return int(getattr(self.module, "num_reg_tokens", 0) or 0)

    # --- input ----------------------------------------------------------------------
    @property
    def mean(self) -> Triple:
        """Per-channel mean of [0, 1] RGB inputs the weights expect (timm's pretrained cfg)."""
        return _triple(getattr(self.module, "pretrained_cfg", {}).get("mean"), 0.5)

    @property
    def std(self) -> Triple:
        """Per-channel std of [0, 1] RGB inputs the weights expect (timm's pretrained cfg)."""
        return _triple(getattr(self.module, "pretrained_cfg", {}).get("std"), 0.5)

    # --- trainable parts --------------------------------------------------------------
    @property
    def blocks(self) -> List[nn.Module]:
        """The transformer blocks, input to output."""
        return list(self.module.blocks)

    @property
    def depth(self) -> int:
        return len(self.module.blocks)

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied to the tokens after the last block: ``norm``, or ``fc_norm`` where
        ``norm`` is an identity (EVA-02 MIM weights, global-average-pool ViTs)."""
        norm = self.module.norm
        if isinstance(norm, nn.Identity) and _has_params(getattr(self.module, "fc_norm", None)):
            return self.module.fc_norm
        return norm

    def set_trainable(self, last_blocks: int) -> None:
        """Freeze the backbone except its last ``last_blocks`` blocks and its final norm.

        ``0`` freezes everything (the warm-up phase); ``-1`` (or the depth or more) trains
        the whole backbone, embeddings and CLIP's ``norm_pre`` included.
        """
        depth = self.depth
        if last_blocks < 0 or last_blocks >= depth:
            for p in self.module.parameters():
                p.requires_grad_(True)
            return
        for p in self.module.parameters():
            p.requires_grad_(False)
        if last_blocks == 0:
            return
        for block in self.blocks[depth - last_blocks :]:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in self.final_norm.parameters():
            p.requires_grad_(True)

    # --- features -------------------------------------------------------------------
    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` (normalised as :attr:`mean` / :attr:`std` say) -> ``[B, h, w, e]``.

        Patch tokens on their grid (h = H / d, w = W / d), prefix tokens dropped, final norm
        applied. H and W must be multiples of the patch size.
        """
        b, _, height, width = images.shape
        d = self._patch
        if height % d or width % d:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {d}")
        tokens = self.module.forward_features(images)  # [B, prefix + h*w, e]; timm applies `norm`
        tokens = tokens[:, self.num_prefix_tokens :]
        norm = self.final_norm
        if norm is not self.module.norm:  # fc_norm: not part of timm's forward_features
            tokens = norm(tokens)
        return tokens.reshape(b, height // d, width // d, -1)


def patch_size_of(backbone: nn.Module) -> int:
    """Patch side of a timm backbone (kept for callers of the old helper)."""
    return BackboneAdapter(backbone).patch_size


def set_trainable(backbone: nn.Module, last_blocks: int) -> None:
    """:meth:`BackboneAdapter.set_trainable` on a bare timm module (kept for old callers)."""
    BackboneAdapter(backbone).set_trainable(last_blocks)


# --- resolution of the config values that depend on the backbone ----------------------


def describe_backbone(
    name: str, backbone_kwargs: Optional[Dict[str, Any]] = None, img_size: Optional[int] = None
) -> BackboneAdapter:
    """An adapter over the backbone built on the ``meta`` device: no memory, no weights, no
    network (about 0.1 s). Answers patch size, prefix tokens, normalisation, depth."""
    check_supported(name)
    try:
        with torch.device("meta"):
            module = timm.create_model(name, pretrained=False, **timm_create_args(img_size, **(backbone_kwargs or {})))
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitpcmError(f"cannot create backbone {name}: {first}") from None
    return BackboneAdapter(module, name)


def describe_configured_backbone(cfg: Any) -> BackboneAdapter:
    """:func:`describe_backbone` of the config's ``model.backbone`` (with its
    ``model.backbone_kwargs``) at ``input.train_size``."""
    kwargs = OmegaConf.to_container(cfg.model.backbone_kwargs, resolve=True) if cfg.model.backbone_kwargs else {}
    return describe_backbone(str(cfg.model.backbone), kwargs, int(cfg.input.train_size))


def resolve_normalisation(cfg: Any, adapter: Optional[BackboneAdapter] = None) -> Tuple[Triple, Triple]:
    """``(mean, std)`` for the transforms: ``input.mean`` / ``input.std``, where ``auto`` is
    the backbone's pretrained config (from ``adapter`` when given, e.g. ``model.adapter``;
    else the backbone is described on the meta device)."""
    mean, std = normalisation_values(cfg, "mean"), normalisation_values(cfg, "std")
    if mean is None or std is None:
        adapter = adapter or describe_configured_backbone(cfg)
        mean = mean if mean is not None else list(adapter.mean)
        std = std if std is not None else list(adapter.std)
    return tuple(mean), tuple(std)  # type: ignore[return-value]
