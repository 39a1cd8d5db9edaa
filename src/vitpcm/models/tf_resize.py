"""TensorFlow's bicubic resize in PyTorch, and the authors' position-embedding resampling.

The authors' ViT (their vit-keras fork) runs at any square size by resizing the 24 x 24
patch part of its position embedding (the CLS entry kept) with
``tf.image.resize(..., method=BICUBIC)``. In TF 2 that is ``ResizeBicubic`` with
``half_pixel_centers=True``, which differs from ``torch.nn.functional.interpolate(mode=
"bicubic", align_corners=False)`` in three ways:

* the cubic kernel is Keys' with ``a = -0.5`` (PyTorch: ``a = -0.75``);
* the kernel is not evaluated exactly: its weights are read from a table of 1024 + 1
  entries per tap, at ``lrint(delta * 1024)`` (delta: fractional part of the source
  position);
* taps outside the grid are dropped and the remaining weights renormalised to sum 1
  (PyTorch clamps the tap index, i.e. repeats the edge value with its weight).

Source position of output index ``x`` (half-pixel centres, all in float32, as TF)::

    scale = in_size / out_size
    s = (x + 0.5) * scale - 0.5;  i = floor(s);  delta = s - i;  k = lrint(delta * 1024)
    taps i-1, i, i+1, i+2 with weights T1[k], T0[k], T0[1024-k], T1[1024-k]

where ``T0[k] = K(k / 1024)`` and ``T1[k] = K(1 + k / 1024)`` for Keys' kernel
``K(t) = (a+2)|t|^3 - (a+3)|t|^2 + 1`` (``|t| <= 1``), ``a|t|^3 - 5a|t|^2 + 8a|t| - 4a``
(``1 < |t| < 2``). The 2-D resize is separable: rows (y) first, then columns (x).

Pure PyTorch (no TensorFlow); the weights are built once per (in, out) size pair in numpy
float32 so that they equal TF's bit for bit; the resize itself is two small matmuls.
``benchmarks/keras_reference/`` checks the whole model against real TensorFlow.
"""

from __future__ import annotations

import functools
import types
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from vitpcm.errors import VitpcmError

TABLE_SIZE = 1024  # TF's kTableSize
KEYS_A = -0.5  # Keys' cubic (TF with half-pixel centres); PyTorch's bicubic uses -0.75

Size = Union[int, Tuple[int, int], Sequence[int]]


@functools.lru_cache(maxsize=4)
def _coeffs_table(a: float = KEYS_A) -> np.ndarray:
    """``[TABLE_SIZE + 1, 2]`` float32: column 0 = K(x), column 1 = K(x + 1), x = i / 1024.

    Computed in double and stored in float32, as TF's ``InitCoeffsTable``."""
    x = np.arange(TABLE_SIZE + 1, dtype=np.float64) / TABLE_SIZE
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    x1 = x + 1.0
    far = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    return np.stack([near, far], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _weights_np(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` float32 interpolation matrix of TF's bicubic resize (one axis)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    table = _coeffs_table(KEYS_A)
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)  # float division, as TF's CalculateResizeScale
    out_loc = np.arange(out_size, dtype=f32)
    src = (out_loc + f32(0.5)) * scale - f32(0.5)  # HalfPixelScaler, float32
    base = np.floor(src).astype(np.int64)
    delta = (src - base.astype(f32)).astype(f32)
    offset = np.rint(delta * f32(TABLE_SIZE)).astype(np.int64)  # lrintf: round half to even
    taps = np.stack([base - 1, base, base + 1, base + 2], axis=1)  # [out, 4]
    weights = np.stack(
        [table[offset, 1], table[offset, 0], table[TABLE_SIZE - offset, 0], table[TABLE_SIZE - offset, 1]], axis=1
    ).astype(f32)
    inside = (taps >= 0) & (taps < in_size)
    weights = np.where(inside, weights, f32(0))
    # TF sums the four taps left to right in float32 and multiplies by the reciprocal
    total = ((weights[:, 0] + weights[:, 1]) + weights[:, 2]) + weights[:, 3]
    ok = np.abs(total) >= f32(1000) * np.finfo(f32).tiny
    inv = np.where(ok, f32(1) / np.where(ok, total, f32(1)), f32(1)).astype(f32)
    weights = (weights * inv[:, None]).astype(f32)
    matrix = np.zeros((out_size, in_size), dtype=f32)
    rows = np.repeat(np.arange(out_size), 4)
    cols = np.clip(taps, 0, in_size - 1).reshape(-1)
    np.add.at(matrix, (rows, cols), weights.reshape(-1))  # dropped taps add 0
    return matrix


def tf_bicubic_weights(in_size: int, out_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The ``[out_size, in_size]`` float32 matrix M of TF's bicubic resize along one axis:
    ``resized = M @ values`` (values ``[in_size, ...]``). Each row sums to 1 (up to float32)."""
    return torch.from_numpy(_weights_np(int(in_size), int(out_size)).copy()).to(device)


def _pair(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return int(size), int(size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size}")
    return size  # type: ignore[return-value]


def tf_bicubic_resize(grid: torch.Tensor, size: Size, channels_last: Optional[bool] = None) -> torch.Tensor:
    """``tf.image.resize(grid, size, method="bicubic")`` (TF 2, no antialias) in PyTorch.

    Args:
        grid: ``[N, C, h, w]`` (channels first, PyTorch layout), or ``[h, w, C]`` /
            ``[N, h, w, C]`` with ``channels_last=True`` (TF layout). A 3-D tensor is taken
            as ``[h, w, C]`` unless ``channels_last=False`` (then ``[C, h, w]``).
        size: ``(H, W)`` or one int for a square.
        channels_last: layout of ``grid`` (default: False for 4-D, True for 3-D).

    Returns the resized grid, same layout, float32 (as TF returns for bicubic), or the
    grid's own floating dtype when it is float64. A resize to the same size returns the
    input unchanged (TF's weights are then exactly the identity).
    """
    if grid.dim() not in (3, 4):
        raise ValueError(f"grid must be [N, C, h, w], [N, h, w, C] or [h, w, C], got shape {tuple(grid.shape)}")
    if channels_last is None:
        channels_last = grid.dim() == 3
    out_h, out_w = _pair(size)
    x = grid.unsqueeze(0) if grid.dim() == 3 else grid
    x = x if channels_last else x.permute(0, 2, 3, 1)  # -> [N, h, w, C]
    in_h, in_w = int(x.shape[1]), int(x.shape[2])
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    if (in_h, in_w) != (out_h, out_w):
        wy = tf_bicubic_weights(in_h, out_h, x.device).to(dtype)  # [H, h]
        wx = tf_bicubic_weights(in_w, out_w, x.device).to(dtype)  # [W, w]
        # full precision even under autocast (bf16 would cost ~1e-2 in the embedding)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = torch.einsum("yi,nijc->nyjc", wy, x)  # along the rows first, as TF
            x = torch.einsum("xj,nyjc->nyxc", wx, x)
    x = x if channels_last else x.permute(0, 3, 1, 2)
    return x[0] if grid.dim() == 3 else x.contiguous()


def resample_pos_embed_tf(
    pos_embed: torch.Tensor,
    new_size: Size,
    old_size: Optional[Size] = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample a ViT position embedding the authors' way (vit-keras ``AddPositionEmbs``).

    Args:
        pos_embed: ``[1, P + h*w, e]``, P prefix entries (CLS) then the patch grid row by row.
        new_size: target grid ``(H, W)`` in patches.
        old_size: the stored grid ``(h, w)``; default square.
        num_prefix_tokens: P; their entries are kept as they are.

    Returns ``[1, P + H*W, e]`` in ``pos_embed``'s dtype; ``pos_embed`` itself when the grid
    does not change. The same signature as ``timm.layers.resample_abs_pos_embed`` (which
    uses PyTorch's bicubic and flips the argmax of a few % of patches at 960 on the
    authors' weights).
    """
    new_h, new_w = _pair(new_size)
    n = int(pos_embed.shape[1]) - int(num_prefix_tokens)
    if old_size is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"position embedding of {n} patch entries is not square: give old_size")
        old_size = (side, side)
    old_h, old_w = _pair(old_size)
    if old_h * old_w != n:
        raise ValueError(f"old_size {old_h}x{old_w} does not match {n} patch entries")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(1, old_h, old_w, -1)
    grid = tf_bicubic_resize(grid, (new_h, new_w), channels_last=True).to(pos_embed.dtype)
    return torch.cat([prefix, grid.reshape(1, new_h * new_w, -1)], dim=1)


# --- the model option: timm's ViT with the TF resize ------------------------------------


def _tf_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` with :func:`resample_pos_embed_tf` for the resize.

    ``x``: ``[B, h, w, e]`` patch tokens (timm's dynamic-size layout) or ``[B, N, e]``.
    Returns ``[B, prefix + h*w, e]`` with the position embedding added (after pos_drop).
    """
    to_cat = []
    if self.cls_token is not None:
        to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
    if getattr(self, "reg_token", None) is not None:
        to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
    if x.dim() == 4:
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
    else:
        h, w = self.patch_embed.grid_size
    if self.pos_embed is None:
        return self.pos_drop(torch.cat(to_cat + [x], dim=1))
    prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    pos_embed = resample_pos_embed_tf(self.pos_embed, (h, w), tuple(self.patch_embed.grid_size), prefix)
    if self.no_embed_class:
        x = x + pos_embed
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
    else:
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
        x = x + pos_embed
    return self.pos_drop(x)


def use_tf_pos_embed_resize(vit: nn.Module, enable: bool = True) -> nn.Module:
    """Make a timm ``VisionTransformer`` resample its position embedding as the authors'
    TF model does (:func:`resample_pos_embed_tf`), or (``enable=False``) as timm does again.

    Only the instance's ``_pos_embed`` is replaced: no parameter, no state-dict key changes,
    other instances are untouched. At the stored grid size nothing changes at all. Returns
    ``vit``.
    """
    if not isinstance(vit, VisionTransformer):
        raise VitpcmError(f"the TF position-embedding resize needs a timm VisionTransformer, got {type(vit).__name__}")
    if enable:
        vit._pos_embed = types.MethodType(_tf_pos_embed, vit)  # type: ignore[method-assign]
    elif "_pos_embed" in vit.__dict__:
        del vit.__dict__["_pos_embed"]
    return vit


def uses_tf_pos_embed_resize(vit: nn.Module) -> bool:
    """Whether :func:`use_tf_pos_embed_resize` is on for this module."""
    method = vit.__dict__.get("_pos_embed")
    return getattr(method, "__func__", None) is _tf_pos_embed
