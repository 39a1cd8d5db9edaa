"""Speed options of a ViT-PCM model, for GPUs mostly: fused attention, regional compilation.

* Fused attention: timm's ``Attention`` calls ``torch.nn.functional.scaled_dot_product_attention``
  (flash / memory-efficient kernels on a GPU) when ``timm.layers.use_fused_attn()`` is true,
  which is timm's default; :func:`attention_report` says whether every block of a model
  uses it (``TIMM_FUSED_ATTN=0`` in the environment turns it off).
* ``torch.compile``: :func:`compile_blocks` compiles each transformer block in place
  (``nn.Module.compile``, "regional compilation": one graph for the repeated block instead
  of the whole model, so compiling is quick and a new input side recompiles one small
  graph). Parameter names and the state dict are unchanged, so checkpoints stay
  compatible. Config key ``train.compile`` (default false).
* Channels-last: a ViT has one convolution, the patch embedding (kernel = stride = patch),
  which cuDNN runs on any layout; everything after it is a sequence of tokens. There is no
  channels-last gain to take, so vitpcm does not convert.
"""

from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn
from timm.layers import use_fused_attn


def attention_report(model: nn.Module) -> Dict[str, Any]:
    """``{"timm_use_fused_attn": bool, "blocks": n, "fused_blocks": k}`` for a ViT-PCM model
    (or a bare timm backbone): how many attention modules take the SDPA path."""
    backbone = getattr(model, "backbone", model)
    blocks = list(getattr(backbone, "blocks", []))
    fused = sum(bool(getattr(getattr(b, "attn", None), "fused_attn", False)) for b in blocks)
    return {"timm_use_fused_attn": bool(use_fused_attn()), "blocks": len(blocks), "fused_blocks": int(fused)}


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile every transformer block of the model's backbone in place with ``torch.compile``
    (``compile_kwargs`` are passed on, e.g. ``mode="max-autotune"``). State-dict keys do not
    change. Returns the number of blocks compiled."""
    backbone = getattr(model, "backbone", model)
    blocks = list(getattr(backbone, "blocks", []))
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
