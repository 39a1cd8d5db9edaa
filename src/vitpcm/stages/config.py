"""The config stage: a preset (or YAML file) and overrides, resolved as training would see it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from vitpcm.config import load_config


def resolved_config(preset: str | Path | None, overrides: Sequence[str] = (), check: bool = True) -> DictConfig:
    """``load_config`` plus what depends on the backbone: ``input.mean`` / ``input.std``
    ``auto`` -> the timm model's pretrained values, and (``check``) every size against the
    backbone's patch size. Imports timm (the backbone is described on the meta device)."""
    from vitpcm.models.backbone import resolve_config

    return resolve_config(load_config(preset, overrides), check=check)
