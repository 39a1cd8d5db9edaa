"""ViT-PCM: image -> ViT -> HV-BiLSTM -> patch classifier -> softmax -> global max pooling.

Read :class:`ViTPCM.forward` top to bottom for the whole data flow. Shapes use
B = batch, e = ViT width, h x w = patch grid (H / d x W / d for patch side d),
C = classes including background (index 0).

The model talks to its backbone only through :class:`~vitpcm.models.backbone.BackboneAdapter`
(patch size, prefix tokens, normalisation, blocks, final norm, patch tokens); the timm
module itself is ``ViTPCM.backbone``, so state-dict keys stay ``backbone.*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from vitpcm.models.backbone import BackboneAdapter, create_backbone
from vitpcm.models.tf_resize import use_tf_pos_embed_resize


class HVBiLSTM(nn.Module):
    """Patch conditioning: a BiLSTM along every row and one along every column of the grid.

    ``[B, h, w, e]`` -> ``[B, h, w, 4 * hidden]`` (row forward/backward, column
    forward/backward states concatenated per patch).

    ``input_dropout``: the authors' Keras ``LSTM(dropout=p)``, in training only. Their LSTMs
    run Keras's cuDNN-capable path (tanh / sigmoid, no recurrent dropout), which multiplies the
    whole ``[batch, time, features]`` input by one elementwise mask drawn per call; each
    direction of a ``Bidirectional`` is its own LSTM, so each draws its own mask. Here: the
    same, one independent mask per direction of each of the two LSTMs (not constant over
    time: that is Keras's per-step fallback path, which their configuration never takes).
    """

    def __init__(self, in_dim: int, hidden: int = 192, dropout: float = 0.2, input_dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.input_dropout = float(input_dropout)
        self.rows = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.cols = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 4 * hidden
        for lstm in (self.rows, self.cols):
            _keras_lstm_init(lstm)
            _single_bias(lstm)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        fold_bias_hh(state_dict, prefix)  # a checkpoint from before the single bias loads as it predicted
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, h, w, e = grid.shape
        x = self.dropout(grid)
        rows = self._run(self.rows, x.reshape(b * h, w, e))  # each row is a sequence over w
        cols = self._run(self.cols, x.transpose(1, 2).reshape(b * w, h, e))  # each column, over h
        rows = rows.reshape(b, h, w, -1)
        cols = cols.reshape(b, w, h, -1).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1)

    def _run(self, lstm: nn.LSTM, seq: torch.Tensor) -> torch.Tensor:
        """``[N, T, e]`` -> ``[N, T, 2 * hidden]``; with input dropout in training, each
        direction sees its own dropped copy of ``seq`` (class docstring)."""
        p = self.input_dropout
        if p <= 0 or not self.training:
            return lstm(seq)[0]
        outs = []
        for suffix, backward in (("", False), ("_reverse", True)):
            weights = [getattr(lstm, f"{n}_l0{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            x = nn.functional.dropout(seq, p, training=True)
            x = x.flip(1) if backward else x
            h0 = x.new_zeros(1, x.shape[0], lstm.hidden_size)
            # one direction of nn.LSTM: (input, (h0, c0), weights, bias, layers, dropout, train, bidirectional, batch_first)
            out = torch.lstm(x, (h0, h0), weights, True, 1, 0.0, True, False, True)[0]
            outs.append(out.flip(1) if backward else out)
        return torch.cat(outs, dim=-1)


def _keras_lstm_init(lstm: nn.LSTM) -> None:
    """Keras's ``LSTMCell`` init, each direction on its own (as each direction of a Keras
    ``Bidirectional`` is its own LSTM).

    Keras draws the input kernel as one ``[in, 4 units]`` matrix (``glorot_uniform``: limit
    ``sqrt(6 / (in + 4 units))``) and the recurrent kernel as one ``[units, 4 units]``
    orthogonal matrix (orthonormal rows over all four gates). PyTorch's ``weight_ih`` /
    ``weight_hh`` are those matrices transposed, gates in the same order (i, f, g/c, o), so
    each is drawn whole: Glorot over ``[4 units, in]`` has the same limit, and an orthogonal
    ``[4 units, units]`` matrix has orthonormal columns. The single bias is zero with the
    forget gate at 1 (``unit_forget_bias``).
    """
    hidden = lstm.hidden_size
    for name, param in lstm.named_parameters():
        if name.startswith("weight_ih"):
            nn.init.xavier_uniform_(param.data)
        elif name.startswith("weight_hh"):
            nn.init.orthogonal_(param.data)
        elif name.startswith("bias_ih"):
            param.data.zero_()
            param.data[hidden : 2 * hidden] = 1.0  # PyTorch gate order: input, forget, cell, output


def _single_bias(lstm: nn.LSTM) -> None:
    """Make ``bias_hh`` a zero buffer: Keras's LSTM has one bias (here ``bias_ih``).

    ``nn.LSTM`` adds ``bias_ih + bias_hh`` in every gate; as two parameters they would get the
    same gradient and their sum would move at twice the rate of the authors' single bias. A
    buffer keeps the state-dict key (checkpoints and ``vitpcm import-keras`` unchanged) and
    is never trained.
    """
    for name in [n for n in lstm._flat_weights_names if n.startswith("bias_hh")]:
        zeros = torch.zeros_like(getattr(lstm, name).data)
        delattr(lstm, name)
        lstm.register_buffer(name, zeros)
    lstm._init_flat_weights()  # the LSTM kernels read their weights from this list


def fold_bias_hh(state_dict: Dict[str, Any], prefix: str = "") -> None:
    """In place: add any non-zero ``bias_hh`` of the LSTMs under ``prefix`` into ``bias_ih``
    and zero it (checkpoints written before ``bias_hh`` became a zero buffer). The LSTM
    computes the same gates: it only ever uses the sum."""
    for key in [k for k in state_dict if k.startswith(prefix) and ".bias_hh_l0" in k]:
        other = key.replace(".bias_hh_l0", ".bias_ih_l0")
        value = state_dict[key]
        if other in state_dict and torch.is_tensor(value) and bool(value.any()):
            state_dict[other] = state_dict[other] + value
            state_dict[key] = torch.zeros_like(value)


class PatchClassifier(nn.Module):
    """Dropout then a bias-free linear map W: ``[..., D]`` -> class scores ``[..., C]``."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.2, init_std: float = 0.05) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, num_classes, bias=False)
        nn.init.normal_(self.linear.weight, mean=0.0, std=init_std)

    @property
    def weight(self) -> torch.Tensor:
        """W as ``[C, D]`` (PyTorch layout; the paper's W is its transpose)."""
        return self.linear.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))


class ViTPCM(nn.Module):
    """ViT-PCM for weakly supervised semantic segmentation.

    Args:
        backbone: timm name of a supported vision transformer (:mod:`vitpcm.models.backbone`),
            e.g. ``vit_base_patch16_384``, ``vit_small_patch14_reg4_dinov2``.
        num_classes: classes including background (21 for VOC, 81 for COCO).
        pretrained: ``True`` (timm weights), ``False``, or a local checkpoint path.
        img_size: nominal input side for the position embeddings (any multiple of the
            patch size works at run time).
        hv_lstm: use the HV-BiLSTM patch conditioning (the paper); ``False`` feeds the ViT
            tokens straight to the classifier (ablation).
        lstm_hidden: hidden units per direction.
        dropout: before the HV-BiLSTM and before the classifier.
        backbone_dropout: dropout in every backbone block while training (timm's
            ``proj_drop_rate``: after the attention projection and after both MLP layers,
            the sites of the authors' vit-keras); frozen blocks drop too, as theirs do.
        lstm_dropout: dropout on the inputs of each LSTM direction (:class:`HVBiLSTM`).
        pos_embed_resize: ``timm`` or ``tf`` (TensorFlow's bicubic, :mod:`vitpcm.models.tf_resize`):
            how position embeddings are resampled to another patch grid.
        classifier_init_std: std of the normal init of W.
        backbone_kwargs: passed to ``timm.create_model``.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: Union[bool, str, Path] = False,
        img_size: Optional[int] = None,
        hv_lstm: bool = True,
        lstm_hidden: int = 192,
        dropout: float = 0.2,
        classifier_init_std: float = 0.05,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        backbone_dropout: float = 0.0,
        lstm_dropout: float = 0.0,
        pos_embed_resize: str = "timm",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes counts background and must be >= 2")
        self.arch = dict(
            backbone=backbone, num_classes=num_classes, img_size=img_size, hv_lstm=hv_lstm,
            lstm_hidden=lstm_hidden, dropout=dropout, classifier_init_std=classifier_init_std,
            backbone_kwargs=dict(backbone_kwargs or {}),
        )  # fmt: skip
        # only when set: checkpoints without them keep the arch of earlier versions
        if backbone_dropout:
            self.arch["backbone_dropout"] = float(backbone_dropout)
        if lstm_dropout:
            self.arch["lstm_dropout"] = float(lstm_dropout)
        if pos_embed_resize != "timm":
            self.arch["pos_embed_resize"] = pos_embed_resize
        self.num_classes = num_classes
        timm_kwargs = dict(backbone_kwargs or {})
        if backbone_dropout:
            timm_kwargs["proj_drop_rate"] = float(backbone_dropout)
        self.backbone = create_backbone(backbone, pretrained, img_size=img_size, **timm_kwargs)
        if pos_embed_resize == "tf":  # TF's bicubic for the position embeddings (imported Keras runs)
            use_tf_pos_embed_resize(self.backbone)
        elif pos_embed_resize != "timm":
            raise ValueError(f"pos_embed_resize must be timm or tf, got {pos_embed_resize!r}")
        # A plain object (not a submodule): no parameters of its own, no extra state-dict keys.
        self._adapter = BackboneAdapter(self.backbone, backbone)
        self.patch_size = self._adapter.patch_size
        width = self._adapter.embed_dim
        self.conditioning = HVBiLSTM(width, lstm_hidden, dropout, lstm_dropout) if hv_lstm else None
        feat_dim = self.conditioning.out_dim if self.conditioning is not None else width
        self.classifier = PatchClassifier(feat_dim, num_classes, dropout, classifier_init_std)

    @property
    def adapter(self) -> BackboneAdapter:
        """The backbone's adapter (rebuilt if ``self.backbone`` was replaced)."""
        if self._adapter.module is not self.backbone:
            self._adapter = BackboneAdapter(self.backbone, self.arch["backbone"])
        return self._adapter

    @property
    def normalisation(self) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
        """``(mean, std)`` of [0, 1] RGB that the backbone's weights expect (timm's pretrained
        cfg; the authors' ViT: 0.5 / 0.5, i.e. inputs in [-1, 1])."""
        return self.adapter.mean, self.adapter.std

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> patch tokens on their grid ``[B, h, w, e]`` (prefix tokens
        (CLS, distillation, registers) dropped, final norm applied)."""
        return self.adapter.patch_tokens(images)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Predict per-patch class distributions and their max-pooled image scores.

        Args:
            images: ``[B, 3, H, W]`` normalised as the backbone expects (:attr:`normalisation`;
                [-1, 1] for the authors' ViT), H and W multiples of the patch size.

        Returns:
            ``logits`` ``[B, C, h, w]``: A = F W per patch;
            ``probs`` ``[B, C, h, w]``: Z, softmax over classes per patch;
            ``pooled`` ``[B, C]``: y_k = max over patches of Z^k (Eq. 2).
        """
        features = self.patch_tokens(images)  # [B, h, w, e]
        if self.conditioning is not None:
            features = self.conditioning(features)  # [B, h, w, 768]
        logits = self.classifier(features)  # [B, h, w, C]
        probs = logits.softmax(dim=-1)
        pooled = probs.amax(dim=(1, 2))  # global max pooling over patches
        return {
            "logits": logits.permute(0, 3, 1, 2),
            "probs": probs.permute(0, 3, 1, 2),
            "pooled": pooled,
        }

    def set_backbone_trainable(self, last_blocks: int) -> None:
        """0: backbone frozen (warm-up); N: last N blocks + final norm; -1: all."""
        self.adapter.set_trainable(last_blocks)

    @classmethod
    def from_arch(cls, arch: Dict[str, Any]) -> "ViTPCM":
        """Rebuild an (untrained) model from the ``arch`` dict stored in checkpoints."""
        return cls(pretrained=False, **arch)


def merge_class_labels(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fold the image tags into patch distributions (the authors' ``merge_class_labels``).

    Absent classes are zeroed; each present class map is divided by its own maximum over
    patches (so it peaks at 1); each patch is renormalised to sum 1. 0 / 0 gives 0.

    Args:
        probs: ``[B, C, h, w]`` per-patch class distributions.
        labels: ``[B, C]`` multi-hot tags.

    Returns ``[B, C, h, w]``.
    """
    merged = probs * labels.to(probs.dtype)[:, :, None, None]
    peak = merged.amax(dim=(2, 3), keepdim=True)
    merged = torch.where(peak > 0, merged / peak.clamp_min(torch.finfo(merged.dtype).tiny), torch.zeros_like(merged))
    total = merged.sum(dim=1, keepdim=True)
    return torch.where(total > 0, merged / total.clamp_min(torch.finfo(merged.dtype).tiny), torch.zeros_like(merged))
