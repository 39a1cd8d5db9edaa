"""Fidelity switches in the model (docs/reproduce.md): backbone dropout in every block while
training (frozen blocks too), LSTM input dropout per direction, align_corners upsampling."""

import torch
import torch.nn as nn

from vitpcm.models.predict import upsample
from vitpcm.models.vitpcm import HVBiLSTM, ViTPCM

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _model(**kw) -> ViTPCM:
    torch.manual_seed(0)
    return ViTPCM("vit_tiny_patch16_224", 3, backbone_kwargs=TINY, lstm_hidden=8, **kw)


def test_backbone_dropout_sites_match_vit_keras():
    m = _model(backbone_dropout=0.1)
    for block in m.backbone.blocks:
        # vit-keras: after the attention output and after both MLP layers; none on the attention weights
        assert block.attn.proj_drop.p == 0.1 and block.mlp.drop1.p == 0.1 and block.mlp.drop2.p == 0.1
        assert block.attn.attn_drop.p == 0.0
    assert m.backbone.pos_drop.p == 0.0  # no embedding dropout in vit-keras
    assert _model().backbone.blocks[0].attn.proj_drop.p == 0.0  # the library default: timm's 0


def test_frozen_blocks_still_drop_in_training():
    m = _model(backbone_dropout=0.1)
    m.set_backbone_trainable(0)  # warm-up: every block frozen
    assert not any(p.requires_grad for p in m.backbone.parameters())
    m.train()
    x = torch.randn(2, 3, 16, 16)
    a, b = m.patch_tokens(x), m.patch_tokens(x)
    assert not torch.allclose(a, b)  # frozen, yet dropout draws differ
    m.eval()
    assert torch.equal(m.patch_tokens(x), m.patch_tokens(x))
    plain = _model()
    plain.train()
    assert torch.equal(plain.patch_tokens(x), plain.patch_tokens(x))


def test_dropout_switches_keep_the_state_dict_and_round_trip_the_arch():
    m = _model(backbone_dropout=0.1, lstm_dropout=0.2)
    assert list(m.state_dict()) == list(_model().state_dict())
    assert m.arch["backbone_dropout"] == 0.1 and m.arch["lstm_dropout"] == 0.2
    again = ViTPCM.from_arch(m.arch)
    assert again.backbone.blocks[0].attn.proj_drop.p == 0.1 and again.conditioning.input_dropout == 0.2
    assert "backbone_dropout" not in _model().arch  # unchanged arch when off


def test_lstm_input_dropout_path_equals_nn_lstm_without_drops():
    torch.manual_seed(0)
    m = HVBiLSTM(6, 5, dropout=0.0, input_dropout=0.0)
    x = torch.randn(2, 3, 4, 6)
    ref = m(x)
    m.input_dropout = 1e-12  # the per-direction path; a drop has probability ~0
    m.train()
    assert torch.allclose(m(x), ref, atol=1e-6)


def test_lstm_input_dropout_draws_one_elementwise_mask_per_direction(monkeypatch):
    torch.manual_seed(0)
    m = HVBiLSTM(6, 5, dropout=0.0, input_dropout=0.2)
    shapes = []
    real = nn.functional.dropout

    def spy(x, p=0.5, training=True, inplace=False):
        if p > 0:  # nn.Dropout(0.0) before the HV-BiLSTM calls it too
            shapes.append((tuple(x.shape), p, training))
        return real(x, p, training, inplace)

    monkeypatch.setattr(nn.functional, "dropout", spy)
    x = torch.randn(2, 3, 4, 6)
    m.train()
    m(x)
    # rows (b*h sequences over w) and columns: forward and backward each draw over the whole [N, T, e]
    assert shapes == [((6, 4, 6), 0.2, True)] * 2 + [((8, 3, 6), 0.2, True)] * 2
    shapes.clear()
    m.eval()
    m(x)
    assert shapes == []  # no input dropout at inference
    monkeypatch.undo()
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_upsample_align_corners_pins_corner_patches():
    probs = torch.rand(2, 3, 3)
    up = upsample(probs, (10, 10), align_corners=True)
    assert torch.allclose(up[:, 0, 0], probs[:, 0, 0]) and torch.allclose(up[:, -1, -1], probs[:, -1, -1])
    assert not torch.allclose(upsample(probs, (10, 10)), up)
