"""The authors' released Keras weights (ViT-PCM /S and /B, ``.h5``) -> a :class:`ViTPCM` state dict.

The authors (deepplants/ViT-PCM, on their vit-keras fork) publish the weights that
``ModelCheckpoint(save_weights_only=True)`` wrote: Keras 2's HDF5 weights format. Its
root attribute ``layer_names`` lists the model's layers; the group of each layer has a
``weight_names`` attribute (load order) and one dataset per weight at
``<layer>/<weight name>`` (``embedding/embedding/kernel:0``; layer names holding "/", as
``Transformer/encoderblock_0``, nest as HDF5 groups). The layers that hold weights:

==============================  =============================================  ==================================
Keras layer                     weights (Keras layout)                         vitpcm key (PyTorch layout)
==============================  =============================================  ==================================
``embedding``                   ``kernel`` [16, 16, 3, e], ``bias`` [e]         ``backbone.patch_embed.proj.*``
``class_token``                 ``cls`` [1, 1, e]                              ``backbone.cls_token``
``Transformer/posembed_input``  ``pos_embedding`` [1, 1 + 24*24, e]            ``backbone.pos_embed``
``Transformer/encoderblock_N``  ``MultiHeadDotProductAttention_1/{query,key,    ``backbone.blocks.N.attn.qkv`` (q, k,
                                value}/{kernel [e, e], bias}``                 v stacked), ``attn.proj``
                                ``.../out/{kernel, bias}``
                                ``Dense_0``, ``Dense_1`` (the MLP)             ``mlp.fc1``, ``mlp.fc2``
                                ``LayerNorm_0``, ``LayerNorm_2`` {gamma, beta}  ``norm1``, ``norm2``
``Transformer/encoder_norm``    ``gamma``, ``beta``                            ``backbone.norm``
``patch_conditioning``          ``{forward,backward}_lstm_{rows,cols}/         ``conditioning.{rows,cols}.*``
                                lstm_cell[_N]/{kernel [e, 4h],                 (``*_reverse`` for backward)
                                recurrent_kernel [h, 4h], bias [4h]}``
``patch_classifier``            ``kernel`` [4h, C] (no bias)                   ``classifier.linear.weight``
==============================  =============================================  ==================================

Dense kernels are ``[in, out]`` (PyTorch: ``[out, in]``); attention heads are split as
column ``head * head_dim + d`` in Keras and row ``head * head_dim + d`` of each third of
timm's fused ``qkv``, so no permutation is needed. Keras' LSTM gate order i, f, c, o is
PyTorch's i, f, g, o; its single bias goes to ``bias_ih`` and ``bias_hh`` is zero. The
``_N`` suffix of ``lstm_cell`` depends on what the saving process had built before, so
cells are matched by direction and axis, not by the exact name. Both models are pre-norm,
exact GELU, LayerNorm eps 1e-6, and drop the CLS token after the final norm; the number of
attention heads is not in the file (S: 6, B: 12 in vit-keras and timm alike).

Anything in the file that is not mapped, or anything the model needs that the file lacks,
is a :class:`VitpcmError` that lists it; a file of another size than the model (e.g. /S
weights for a /B config) is one line naming the override that fits.

At sizes other than 384 the authors resize the position embedding with TensorFlow's
bicubic: see :mod:`vitpcm.models.tf_resize`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from vitpcm.errors import VitpcmError

PathLike = Union[str, Path]

#: timm backbones of the widths the authors used (vit-keras S/16, B/16; L/16 for completeness)
BACKBONE_BY_WIDTH = {384: "vit_small_patch16_384", 768: "vit_base_patch16_384", 1024: "vit_large_patch16_384"}

#: BPM mIoU (%) in the authors' README for their released files: (width, classes) -> numbers
PUBLISHED_BPM = {
    (384, 21): {"model": "ViT-PCM/S", "dataset": "VOC2012", "train": 67.57, "val": 66.08},
    (768, 21): {"model": "ViT-PCM/B", "dataset": "VOC2012", "train": 71.79, "val": 69.23},
    (768, 81): {"model": "ViT-PCM/B", "dataset": "COCO2014", "train": None, "val": 45.03},
}

_LAYER_EMBED = "embedding"
_LAYER_CLS = "class_token"
_LAYER_POS = "Transformer/posembed_input"
_LAYER_NORM = "Transformer/encoder_norm"
_LAYER_HEAD = "patch_conditioning"
_LAYER_CLASSIFIER = "patch_classifier"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)$")
_SUFFIX = r"(?::\d+)?$"  # TF variable names end in ":0"


def _tail(pattern: str) -> "re.Pattern[str]":
    return re.compile(r"(?:^|/)" + pattern + _SUFFIX)


_W_KERNEL, _W_BIAS = _tail("kernel"), _tail("bias")
_W_GAMMA, _W_BETA = _tail("gamma"), _tail("beta")
_W_CLS, _W_POS = _tail("cls"), _tail("pos_embedding")
_W_ATTN = _tail(r"MultiHeadDotProductAttention_1/(query|key|value|out)/(kernel|bias)")
_W_MLP = _tail(r"Dense_([01])/(kernel|bias)")
_W_LN = _tail(r"LayerNorm_([02])/(gamma|beta)")
_W_LSTM = _tail(r"(forward|backward)_lstm_(rows|cols)/lstm_cell(?:_\d+)?/(kernel|recurrent_kernel|bias)")
_W_LSTM_ANY = _tail(r"(kernel|recurrent_kernel|bias)")


# --- reading the file --------------------------------------------------------------------


@dataclass
class KerasWeights:
    """The tensors of a Keras-2 HDF5 weights file, layer by layer, in load order.

    Attributes:
        path: the file.
        layers: layer name -> list of ``(weight name, array)``; layers without weights left out.
        attrs: the root attributes other than ``layer_names`` (``keras_version``, ``backend``).
    """

    path: Path
    layers: Dict[str, List[Tuple[str, np.ndarray]]]
    attrs: Dict[str, str] = field(default_factory=dict)

    def names(self) -> List[str]:
        """Every weight as ``layer:weight name``."""
        return [f"{layer}:{name}" for layer, items in self.layers.items() for name, _ in items]

    def count(self) -> int:
        return sum(len(items) for items in self.layers.values())


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def read_keras_h5(path: PathLike) -> KerasWeights:
    """Read a Keras-2 HDF5 weights file (``model.save_weights("x.h5")``, or the
    ``model_weights`` group of a whole-model ``.h5``) into memory.

    Raises :class:`VitpcmError` when the file is missing, is not HDF5, or is not in that format.
    """
    path = Path(path)
    if not path.is_file():
        raise VitpcmError(f"Keras weights {path} not found")
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        raise VitpcmError("reading Keras .h5 weights needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise VitpcmError(
            f"{path} is not an HDF5 file ({str(exc).splitlines()[0]}): give the authors' .h5 weights"
        ) from None
    with f:
        root = f
        if "layer_names" not in root.attrs and "model_weights" in root:
            root = root["model_weights"]  # a whole model saved with model.save("x.h5")
        if "layer_names" not in root.attrs:
            raise VitpcmError(
                f"{path} is not a Keras-2 weights file (no 'layer_names' attribute; a Keras 3 '.weights.h5'"
                " has another layout): give the .h5 written by ModelCheckpoint(save_weights_only=True)"
            )
        attrs = {k: _text(v) for k, v in root.attrs.items() if k != "layer_names"}
        layers: Dict[str, List[Tuple[str, np.ndarray]]] = {}
        for layer in (_text(n) for n in root.attrs["layer_names"]):
            if layer not in root:
                raise VitpcmError(f"{path}: layer '{layer}' is listed in layer_names but has no group")
            group = root[layer]
            items = []
            for name in (_text(n) for n in group.attrs.get("weight_names", [])):
                if name not in group:
                    raise VitpcmError(f"{path}: weight '{name}' of layer '{layer}' is listed but missing")
                items.append((name, np.asarray(group[name][()], dtype=np.float32)))
            if items:
                layers[layer] = items
    return KerasWeights(path=path, layers=_flatten_nested(layers), attrs=attrs)


_KNOWN_LAYER = re.compile(
    r"^(embedding|class_token|Transformer/posembed_input|Transformer/encoderblock_\d+|Transformer/encoder_norm"
    r"|patch_conditioning|patch_classifier)/"
)


def _flatten_nested(layers: Dict[str, List[Tuple[str, np.ndarray]]]) -> Dict[str, List[Tuple[str, np.ndarray]]]:
    """Weights of a nested model (a backbone saved as one layer, e.g. ``patch_encoder``) filed
    under the layer their own name starts with (``embedding/kernel:0`` -> ``embedding``), so
    both the authors' flat model and a nested one read the same. Others stay where they are."""
    known = {"embedding", "class_token", _LAYER_POS, _LAYER_NORM, _LAYER_HEAD, _LAYER_CLASSIFIER}
    out: Dict[str, List[Tuple[str, np.ndarray]]] = {}
    for layer, items in layers.items():
        nested = layer not in known and not _BLOCK.match(layer)
        for name, value in items:
            m = _KNOWN_LAYER.match(name) if nested else None
            out.setdefault(m.group(1) if m else layer, []).append((name, value))
    return out


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (recorded in the imported checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# --- what the file describes -------------------------------------------------------------


@dataclass
class KerasSpec:
    """The sizes of a ViT-PCM stored in a Keras file (or wanted by a vitpcm model)."""

    width: int  # e
    depth: int  # transformer blocks
    mlp_dim: int
    patch: int
    grid: Tuple[int, int]  # position-embedding grid (24 x 24 for the authors' 384)
    lstm_hidden: Optional[int]  # None: no HV-BiLSTM
    num_classes: int

    def describe(self) -> str:
        head = f"HV-BiLSTM {self.lstm_hidden}" if self.lstm_hidden else "no HV-BiLSTM"
        return (f"width {self.width}, {self.depth} blocks, MLP {self.mlp_dim}, patch {self.patch},"
                f" {self.grid[0]}x{self.grid[1]} position grid, {head}, {self.num_classes} classes")  # fmt: skip


def _find(weights: KerasWeights, layer: str, pattern: "re.Pattern[str]") -> Optional[np.ndarray]:
    for name, value in weights.layers.get(layer, []):
        if pattern.search(name):
            return value
    return None


def _need(weights: KerasWeights, layer: str, pattern: "re.Pattern[str]", what: str) -> np.ndarray:
    value = _find(weights, layer, pattern)
    if value is None:
        if not weights.layers:
            raise VitpcmError(f"{weights.path} holds no weights at all")
        raise VitpcmError(
            f"{weights.path} is not a ViT-PCM of the authors' code: no {what} in layer '{layer}'"
            f" (layers with weights: {_short(list(weights.layers))})"
        )
    return value


def keras_spec(weights: KerasWeights) -> KerasSpec:
    """Read the sizes of the stored model (:class:`KerasSpec`) from its tensor shapes."""
    kernel = _need(weights, _LAYER_EMBED, _W_KERNEL, "patch-embedding kernel")
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
        raise VitpcmError(
            f"{weights.path}: patch-embedding kernel has shape {list(kernel.shape)}, expected [p, p, 3, width]"
        )
    width, patch = int(kernel.shape[3]), int(kernel.shape[0])
    pos = _need(weights, _LAYER_POS, _W_POS, "position embedding")
    cells = int(pos.shape[1]) - 1
    side = int(round(cells**0.5))
    if pos.ndim != 3 or side * side != cells:
        raise VitpcmError(
            f"{weights.path}: position embedding has shape {list(pos.shape)}, expected [1, 1 + g*g, width]"
        )
    blocks = sorted(int(m.group(1)) for m in (_BLOCK.match(n) for n in weights.layers) if m)
    if blocks != list(range(len(blocks))) or not blocks:
        raise VitpcmError(
            f"{weights.path}: transformer blocks {blocks or 'none'} found; expected Transformer/encoderblock_0..N-1"
        )
    fc1 = _need(
        weights, f"Transformer/encoderblock_{blocks[0]}", re.compile(r"(?:^|/)Dense_0/kernel" + _SUFFIX), "MLP Dense_0"
    )
    classifier = _need(weights, _LAYER_CLASSIFIER, _W_KERNEL, "classifier kernel")
    recurrent = _find(weights, _LAYER_HEAD, _tail(r"recurrent_kernel"))
    return KerasSpec(
        width=width, depth=len(blocks), mlp_dim=int(fc1.shape[-1]), patch=patch, grid=(side, side),
        lstm_hidden=int(recurrent.shape[0]) if recurrent is not None else None, num_classes=int(classifier.shape[-1]),
    )  # fmt: skip


def model_spec(model: nn.Module) -> KerasSpec:
    """The same sizes for a vitpcm :class:`~vitpcm.models.vitpcm.ViTPCM`."""
    adapter = model.adapter
    vit = adapter.module
    fc1 = adapter.blocks[0].mlp.fc1
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    lstm = model.conditioning.rows.hidden_size if model.conditioning is not None else None
    return KerasSpec(
        width=adapter.embed_dim, depth=adapter.depth, mlp_dim=int(fc1.out_features), patch=adapter.patch_size,
        grid=grid, lstm_hidden=lstm, num_classes=int(model.num_classes),
    )  # fmt: skip


def suggest_overrides(spec: KerasSpec, wanted: Optional[KerasSpec] = None) -> List[str]:
    """``key=value`` overrides that build a vitpcm model of ``spec``'s sizes (only those that
    differ from ``wanted``, the model the config builds now, when given)."""

    def differs(*keys: str) -> bool:
        return wanted is None or any(getattr(spec, k) != getattr(wanted, k) for k in keys)

    out = []
    if differs("width", "depth", "mlp_dim", "patch"):
        if spec.patch == 16 and spec.width in BACKBONE_BY_WIDTH:
            out.append(f"model.backbone={BACKBONE_BY_WIDTH[spec.width]}")
        else:
            out += [f"model.backbone_kwargs.embed_dim={spec.width}", f"model.backbone_kwargs.depth={spec.depth}",
                    f"model.backbone_kwargs.mlp_ratio={spec.mlp_dim / spec.width:g}",
                    f"model.backbone_kwargs.patch_size={spec.patch}"]  # fmt: skip
    if spec.grid != (wanted.grid if wanted is not None else (24, 24)):  # 24 x 24: 384, the presets
        out.append(f"input.train_size={spec.grid[0] * spec.patch}")
    if wanted is None or (spec.lstm_hidden is None) != (wanted.lstm_hidden is None):
        out.append("model.hv_lstm=true" if spec.lstm_hidden else "model.hv_lstm=false")
    if spec.lstm_hidden and spec.lstm_hidden != (192 if wanted is None else wanted.lstm_hidden):  # 192: the presets
        out.append(f"model.lstm_hidden={spec.lstm_hidden}")
    return out


def check_fits(
    stored: KerasSpec, wanted: KerasSpec, source: str = "the weights", config_hint: str = "the config"
) -> None:
    """One-line :class:`VitpcmError` when the stored sizes differ from the model's."""
    diffs = [
        f"{k} {getattr(stored, k)} vs {getattr(wanted, k)}"
        for k in asdict(stored)
        if getattr(stored, k) != getattr(wanted, k)
    ]
    if not diffs:
        return
    if stored.num_classes != wanted.num_classes and len(diffs) == 1:
        raise VitpcmError(
            f"{source} hold {stored.num_classes} classes but {config_hint} gives {wanted.num_classes}:"
            " use the config of the dataset they were trained on (voc12: 21, coco14: 81) or set data.classes"
        )
    fix = " ".join(suggest_overrides(stored, wanted)) or "a config of these sizes"
    raise VitpcmError(f"{source} do not fit {config_hint} ({'; '.join(diffs)}; stored: {stored.describe()}): add {fix}")


# --- mapping -----------------------------------------------------------------------------


def _short(items: Sequence[str], n: int = 8) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


class _Mapper:
    """Takes Keras tensors out of a :class:`KerasWeights`, recording what was used and missing."""

    def __init__(self, weights: KerasWeights) -> None:
        self.weights = weights
        self.used: set = set()
        self.missing: List[str] = []
        self.state: Dict[str, torch.Tensor] = {}

    def take(
        self, layer: str, pattern: "re.Pattern[str]", what: str, group: Optional[Tuple[Any, ...]] = None
    ) -> Optional[np.ndarray]:
        hits = []
        for name, value in self.weights.layers.get(layer, []):
            m = pattern.search(name)
            if m and (group is None or m.groups() == group) and (layer, name) not in self.used:
                hits.append((name, value))
        if not hits:
            self.missing.append(f"{layer}: {what}")
            return None
        if len(hits) > 1:
            raise VitpcmError(
                f"{self.weights.path}: layer '{layer}' holds {len(hits)} tensors for {what}: {_short([h[0] for h in hits])}"
            )
        self.used.add((layer, hits[0][0]))
        return hits[0][1]

    def put(self, key: str, value: Optional[np.ndarray]) -> None:
        if value is not None:
            self.state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))

    def leftover(self) -> List[str]:
        return [
            f"{layer}:{name}"
            for layer, items in self.weights.layers.items()
            for name, _ in items
            if (layer, name) not in self.used
        ]


def _dense_in_out(kernel: np.ndarray, width: int) -> np.ndarray:
    """A Dense kernel as [in, out] (accepts vit-keras's [e, e] and Flax's [e, heads, d] / [heads, d, e])."""
    if kernel.ndim == 3:
        return kernel.reshape(width, -1) if kernel.shape[0] == width else kernel.reshape(-1, width)
    return kernel


def keras_to_state_dict(weights: KerasWeights, spec: Optional[KerasSpec] = None) -> Dict[str, torch.Tensor]:
    """Map the Keras tensors onto vitpcm ``ViTPCM`` state-dict keys (PyTorch layouts).

    Raises :class:`VitpcmError` listing every expected tensor the file lacks and every
    tensor of the file that has no place in the model.
    """
    spec = spec or keras_spec(weights)
    e = spec.width
    m = _Mapper(weights)
    kernel = m.take(_LAYER_EMBED, _W_KERNEL, "kernel")
    # Conv2D kernel [p, p, 3, e] -> Conv2d weight [e, 3, p, p]
    m.put("backbone.patch_embed.proj.weight", None if kernel is None else kernel.transpose(3, 2, 0, 1))
    m.put("backbone.patch_embed.proj.bias", m.take(_LAYER_EMBED, _W_BIAS, "bias"))
    m.put("backbone.cls_token", m.take(_LAYER_CLS, _W_CLS, "cls"))
    m.put("backbone.pos_embed", m.take(_LAYER_POS, _W_POS, "pos_embedding"))
    for n in range(spec.depth):
        layer, key = f"Transformer/encoderblock_{n}", f"backbone.blocks.{n}"
        attn = {}
        for part in ("query", "key", "value", "out"):
            for kind in ("kernel", "bias"):
                attn[part, kind] = m.take(layer, _W_ATTN, f"MultiHeadDotProductAttention_1/{part}/{kind}", (part, kind))
        if all(attn[p, "kernel"] is not None for p in ("query", "key", "value")):
            m.put(
                f"{key}.attn.qkv.weight",
                np.concatenate([_dense_in_out(attn[p, "kernel"], e).T for p in ("query", "key", "value")], 0),
            )
        if all(attn[p, "bias"] is not None for p in ("query", "key", "value")):
            m.put(
                f"{key}.attn.qkv.bias",
                np.concatenate([attn[p, "bias"].reshape(-1) for p in ("query", "key", "value")], 0),
            )
        if attn["out", "kernel"] is not None:
            m.put(f"{key}.attn.proj.weight", _dense_in_out(attn["out", "kernel"], e).T)
        m.put(f"{key}.attn.proj.bias", None if attn["out", "bias"] is None else attn["out", "bias"].reshape(-1))
        for idx, name in (("0", "fc1"), ("1", "fc2")):
            k = m.take(layer, _W_MLP, f"Dense_{idx}/kernel", (idx, "kernel"))
            m.put(f"{key}.mlp.{name}.weight", None if k is None else k.T)
            m.put(f"{key}.mlp.{name}.bias", m.take(layer, _W_MLP, f"Dense_{idx}/bias", (idx, "bias")))
        for idx, name in (("0", "norm1"), ("2", "norm2")):
            m.put(f"{key}.{name}.weight", m.take(layer, _W_LN, f"LayerNorm_{idx}/gamma", (idx, "gamma")))
            m.put(f"{key}.{name}.bias", m.take(layer, _W_LN, f"LayerNorm_{idx}/beta", (idx, "beta")))
    m.put("backbone.norm.weight", m.take(_LAYER_NORM, _W_GAMMA, "gamma"))
    m.put("backbone.norm.bias", m.take(_LAYER_NORM, _W_BETA, "beta"))
    if spec.lstm_hidden:
        _map_lstms(m)
    k = m.take(_LAYER_CLASSIFIER, _W_KERNEL, "kernel")
    m.put("classifier.linear.weight", None if k is None else k.T)
    if m.missing:
        raise VitpcmError(f"{weights.path} lacks {len(m.missing)} tensors of the authors' ViT-PCM: {_short(m.missing)}")
    left = m.leftover()
    if left:
        raise VitpcmError(f"{weights.path} holds {len(left)} tensors that have no place in ViT-PCM: {_short(left)}")
    return m.state


_LSTM_ORDER = [(d, a) for a in ("rows", "cols") for d in ("forward", "backward")]  # the order Keras builds them


def _map_lstms(m: _Mapper) -> None:
    """The four LSTMs of ``patch_conditioning``, by direction and axis in their names; if the
    names carry neither (another Keras naming), by position: rows then cols, forward then
    backward, each kernel, recurrent_kernel, bias (the order the authors' layer builds them)."""
    items = m.weights.layers.get(_LAYER_HEAD, [])
    named = [name for name, _ in items if _W_LSTM.search(name)]
    if named or not items:
        for direction, axis in _LSTM_ORDER:
            parts = {kind: m.take(_LAYER_HEAD, _W_LSTM, f"{direction}_lstm_{axis}/lstm_cell/{kind}", (direction, axis, kind))
                     for kind in ("kernel", "recurrent_kernel", "bias")}  # fmt: skip
            _put_lstm(m, direction, axis, parts)
        return
    kinds = [(_W_LSTM_ANY.search(name), name, value) for name, value in items]
    if len(items) != 12 or any(k is None for k, _, _ in kinds):
        m.missing.append(
            f"{_LAYER_HEAD}: 4 LSTMs (kernel, recurrent_kernel, bias each); found {_short([n for _, n, _ in kinds])}"
        )
        return
    for i, (direction, axis) in enumerate(_LSTM_ORDER):
        chunk = kinds[3 * i : 3 * i + 3]
        got = [k.group(1) for k, _, _ in chunk]
        if got != ["kernel", "recurrent_kernel", "bias"]:
            m.missing.append(f"{_LAYER_HEAD}: {direction} {axis} LSTM (found {got})")
            continue
        for _, name, _ in chunk:
            m.used.add((_LAYER_HEAD, name))
        _put_lstm(m, direction, axis, {k.group(1): value for k, _, value in chunk})


def _put_lstm(m: _Mapper, direction: str, axis: str, parts: Dict[str, Optional[np.ndarray]]) -> None:
    suffix = "_reverse" if direction == "backward" else ""
    key = f"conditioning.{axis}"
    kernel, recurrent, bias = parts.get("kernel"), parts.get("recurrent_kernel"), parts.get("bias")
    # [in, 4h] -> [4h, in]; Keras' gate blocks i, f, c, o are PyTorch's i, f, g, o
    m.put(f"{key}.weight_ih_l0{suffix}", None if kernel is None else kernel.T)
    m.put(f"{key}.weight_hh_l0{suffix}", None if recurrent is None else recurrent.T)
    m.put(f"{key}.bias_ih_l0{suffix}", bias)
    m.put(f"{key}.bias_hh_l0{suffix}", None if bias is None else np.zeros_like(bias))  # Keras has one bias


# --- into a model ------------------------------------------------------------------------


def load_keras_weights(
    model: nn.Module, weights: Union[PathLike, KerasWeights], config_hint: str = "the config"
) -> Dict[str, Any]:
    """Load the authors' Keras weights into a vitpcm ``ViTPCM`` (in place).

    Args:
        model: a :class:`~vitpcm.models.vitpcm.ViTPCM` on a timm ViT with a CLS token, of the
            sizes stored in the file (:func:`keras_spec`).
        weights: the ``.h5`` path, or what :func:`read_keras_h5` returned.
        config_hint: how to name the model's configuration in error messages.

    Returns ``{"tensors": Keras tensors read, "parameters": model parameters set,
    "spec": KerasSpec as a dict, "keras": root attributes of the file}``.

    Raises :class:`VitpcmError`: sizes that differ (one line with the overrides that fit),
    tensors missing from or left over in the file (listed), model keys not covered.
    """
    if not isinstance(weights, KerasWeights):
        weights = read_keras_h5(weights)
    vit = model.adapter.module
    if (
        getattr(vit, "cls_token", None) is None
        or int(vit.num_prefix_tokens) != 1
        or getattr(vit, "no_embed_class", False)
    ):
        raise VitpcmError(
            f"{config_hint} builds a backbone without the single CLS token of the authors' ViT: use model.backbone=vit_*_patch16_384"
        )
    stored = keras_spec(weights)
    check_fits(stored, model_spec(model), f"the weights in {weights.path.name}", config_hint)
    state = keras_to_state_dict(weights, stored)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        parts = ([f"model tensors not in the file: {_short(missing)}"] if missing else []) + \
                ([f"mapped tensors the model lacks: {_short(extra)}"] if extra else [])  # fmt: skip
        raise VitpcmError(f"{weights.path.name} does not cover {config_hint}'s model: " + "; ".join(parts))
    wrong = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise VitpcmError(f"{weights.path.name}: tensor shapes differ from {config_hint}'s model: {_short(wrong, 4)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return {
        "tensors": weights.count(),
        "parameters": int(sum(v.numel() for v in state.values())),
        "spec": asdict(stored),
        "keras": dict(weights.attrs),
    }


def published_bpm(spec: KerasSpec) -> Optional[Dict[str, Any]]:
    """The BPM mIoU the authors' README gives for the released file of these sizes, if any."""
    row = PUBLISHED_BPM.get((spec.width, spec.num_classes))
    return dict(row) if row else None
