"""Model registry: rebuild any trainable model from the ``arch`` dict of its checkpoint.

A checkpoint stores ``arch``: the constructor arguments of its model plus a ``"name"``
that picks the builder (``"vitpcm"`` when absent: checkpoints written before the registry
have no name). :func:`create_model` is what loaders call, so the checkpoint code never
names a model class; a new model (e.g. the DeepLab of the verification stage) registers
a builder with :func:`register_model` and its checkpoints load through the same path.

Builders are imported on first use, so importing this module pulls in neither timm nor a
model module.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Mapping, Union

import torch.nn as nn
from omegaconf import OmegaConf

from vitpcm.errors import VitpcmError

DEFAULT_NAME = "vitpcm"  # what an ``arch`` without "name" is (checkpoints before the registry)

ArchBuilder = Callable[[Dict[str, Any]], nn.Module]

# name -> builder, or "module:attribute" of a builder imported on first use
_REGISTRY: Dict[str, Union[ArchBuilder, str]] = {
    "vitpcm": "vitpcm.models.registry:_build_vitpcm_from_arch",
    "deeplab": "vitpcm.models.deeplab:deeplab_from_arch",  # the verification stage (`vitpcm segment`)
}


def register_model(name: str, builder_from_arch: Union[ArchBuilder, str]) -> None:
    """Make ``create_model({"name": name, ...})`` call ``builder_from_arch(arch_without_name)``.

    ``builder_from_arch`` is a callable or a ``"package.module:function"`` string (imported
    when first needed). Registering a name again replaces its builder.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = builder_from_arch


def registered_models() -> list:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def _resolve(name: str) -> ArchBuilder:
    builder = _REGISTRY[name]
    if isinstance(builder, str):
        module, _, attr = builder.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = builder
    return builder


def create_model(arch: Mapping[str, Any]) -> nn.Module:
    """An untrained model from a checkpoint's ``arch`` dict (weights are loaded by the caller).

    ``arch["name"]`` picks the builder (default ``"vitpcm"``); the other keys go to it.
    """
    arch = dict(arch)
    name = str(arch.pop("name", DEFAULT_NAME) or DEFAULT_NAME)
    if name not in _REGISTRY:
        raise VitpcmError(
            f"checkpoint model '{name}' is unknown to this vitpcm (known: {', '.join(registered_models())}):"
            " update vitpcm or load the checkpoint with the version that wrote it"
        )
    return _resolve(name)(arch)


def model_arch(model: nn.Module, name: str = DEFAULT_NAME) -> Dict[str, Any]:
    """The ``arch`` dict to store in a checkpoint: ``{"name": name, **model.arch}``."""
    return {"name": name, **dict(model.arch)}


def _build_vitpcm_from_arch(arch: Dict[str, Any]) -> nn.Module:
    from vitpcm.models.vitpcm import ViTPCM  # lazy: importing the registry pulls in no model (nor timm)

    return ViTPCM.from_arch(arch)


def build_model(cfg: Any, num_classes: int) -> nn.Module:
    """The ViT-PCM model the config describes (``model.*``, ``input.train_size``).

    ``cfg`` is a prepared config: its sizes were checked against the backbone's patch size
    once, by :func:`vitpcm.stages.config.prepare_config`. ``model.init_from`` (weights of
    another checkpoint) is the caller's job: reading checkpoints belongs to the engine, which
    models never import.
    """
    from vitpcm.models.vitpcm import ViTPCM  # lazy: importing the registry pulls in no model (nor timm)

    m = cfg.model
    return ViTPCM(
        backbone=m.backbone,
        num_classes=num_classes,
        pretrained=m.pretrained,
        img_size=cfg.input.train_size,
        hv_lstm=m.hv_lstm,
        lstm_hidden=m.lstm_hidden,
        dropout=m.dropout,
        classifier_init_std=m.classifier_init_std,
        backbone_kwargs=OmegaConf.to_container(m.backbone_kwargs, resolve=True),
        backbone_dropout=float(m.get("backbone_dropout", 0.0)),
        lstm_dropout=float(m.get("lstm_dropout", 0.0)),
        pos_embed_resize=str(m.get("pos_embed_resize", "timm")),
    )
